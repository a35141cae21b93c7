//! The Caddyfile front end: the subset of Caddy's syntax a home lab uses, parsed into the
//! same [`EdgeToml`] a TOML file gives (so `edge adapt` prints it as TOML).
//!
//! Supported: the global options block (`email`, `http_port`, `https_port`,
//! `storage file_system PATH`, `default_bind`, `grace_period`, `admin off`, `acme_ca`,
//! `acme_ca_root`, `acme_dns`, `key_type`, `renewal_window_ratio`, `auto_https`, `log`,
//! `servers`, `local_certs`, `skip_install_trust`, `on_demand_tls`, and labkit's own
//! `acme_challenges` and `acme_retry_base`), `{$ENV}` and `{$ENV:default}` substitution,
//! snippets and imports, and site blocks with one or more addresses holding `tls` (internal,
//! EMAIL, CERT KEY, with `protocols`, `ciphers`, `curves`, `alpn`, `on_demand`, `client_auth`,
//! `issuer`, `dns PROVIDER` with the propagation options), `log` and the directives of
//! [`crate::directives`].
//! Anything else is an error naming the file, the line and the directive, never silently
//! ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use labcore::config::{ConfigError, ConfigFile};
use labcore::{Env, Exit, ExitStatus};

use crate::config::{self, Config, EdgeToml, SiteToml};
use crate::directives::{self, Line, Scope};
use crate::dns01::{DnsToml, SecretText};

/// A Caddyfile that cannot be used: where and why.
#[derive(Debug, thiserror::Error)]
pub enum CaddyfileError {
    /// The file could not be read.
    #[error("reading Caddyfile {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Syntax or meaning is wrong at a line.
    #[error("{}:{line}: {message}", path.display())]
    At {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

impl ExitStatus for CaddyfileError {
    fn exit(&self) -> Exit {
        match self {
            CaddyfileError::Read { source, .. } => Exit::from_io(source),
            CaddyfileError::At { .. } => Exit::Config,
        }
    }
}

/// Parses and resolves Caddyfile `text` (an admin `/load`), as if read from `path`.
pub(crate) fn load_text(path: &Path, text: &str, env: &Env) -> Result<Config, CaddyfileError> {
    let parsed = parse(path, text, env)?;
    config::resolve(parsed.toml.clone(), &ConfigFile::new(path), env)
        .map_err(|err| parsed.locate(path, err))
}

/// Reads, parses and resolves a Caddyfile.
pub(crate) fn load(path: &Path, env: &Env) -> Result<Config, CaddyfileError> {
    let text = std::fs::read_to_string(path).map_err(|source| CaddyfileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let parsed = parse(path, &text, env)?;
    config::resolve(parsed.toml.clone(), &ConfigFile::new(path), env)
        .map_err(|err| parsed.locate(path, err))
}

/// A parsed Caddyfile: its TOML equivalent and the line each part came from.
#[derive(Debug)]
pub(crate) struct Parsed {
    /// The equivalent TOML config.
    pub(crate) toml: EdgeToml,
    /// Location of each TOML key prefix ("site[0]", "site[0].route[1]", "email").
    lines: BTreeMap<String, usize>,
    /// File and line of each location.
    locs: Vec<(PathBuf, usize)>,
}

impl Parsed {
    /// Turns an error about a TOML key into one about the Caddyfile line it came from.
    fn locate(&self, path: &Path, err: ConfigError) -> CaddyfileError {
        let (key, message) = match &err {
            ConfigError::Invalid { key, message, .. } => (key.as_str(), message.clone()),
            other => ("", labcore::exit::chain(other)),
        };
        let loc = self
            .lines
            .iter()
            .filter(|(prefix, _)| key.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(1, |(_, line)| *line);
        let (path, line) = self
            .locs
            .get(loc)
            .cloned()
            .unwrap_or_else(|| (path.to_owned(), loc));
        CaddyfileError::At {
            path,
            line,
            message,
        }
    }
}

#[derive(Clone, Debug)]
struct Token {
    text: String,
    line: usize,
    quoted: bool,
}

impl Token {
    fn is(&self, s: &str) -> bool {
        !self.quoted && self.text == s
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A line of tokens and the block it opens, if any.
#[derive(Clone, Debug)]
struct Node {
    tokens: Vec<Token>,
    line: usize,
    block: Option<Vec<Node>>,
}

/// Where each token came from: `Token::line` is an index into `locs`, which maps it to a
/// file and line. The main file's line N is index N; imported files and each use of a
/// snippet get indexes of their own, so the lines of two imports never run together.
struct Parser<'a> {
    path: &'a Path,
    locs: std::cell::RefCell<Vec<(PathBuf, usize)>>,
}

impl Parser<'_> {
    fn err(&self, line: usize, message: impl Into<String>) -> CaddyfileError {
        let (path, line) = self.place(line);
        CaddyfileError::At {
            path,
            line,
            message: message.into(),
        }
    }

    /// The file and line of a location.
    fn place(&self, loc: usize) -> (PathBuf, usize) {
        self.locs
            .borrow()
            .get(loc)
            .cloned()
            .unwrap_or_else(|| (self.path.to_owned(), loc))
    }

    /// A new location, a copy of `loc`'s place.
    fn copy(&self, loc: usize) -> usize {
        let place = self.place(loc);
        let mut locs = self.locs.borrow_mut();
        locs.push(place);
        locs.len() - 1
    }
}

/// How deep imports may nest (a file importing itself stops here).
const MAX_IMPORT_DEPTH: usize = 10;

/// Removes snippet definitions `(name) { ... }` and replaces `import` lines with the
/// snippet's or files' tokens, arguments substituted.
fn expand(
    p: &Parser<'_>,
    tokens: Vec<Token>,
    env: &Env,
    depth: usize,
    snippets: &mut BTreeMap<String, Vec<Token>>,
) -> Result<Vec<Token>, CaddyfileError> {
    let mut out = Vec::with_capacity(tokens.len());
    let mut i = 0;
    let mut level = 0usize;
    while i < tokens.len() {
        let t = &tokens[i];
        let line_start = i == 0 || tokens[i - 1].line != t.line;
        let line_end = tokens[i..]
            .iter()
            .position(|x| x.line != t.line)
            .map_or(tokens.len(), |n| i + n);
        if line_start
            && level == 0
            && !t.quoted
            && t.text.len() > 2
            && t.text.starts_with('(')
            && t.text.ends_with(')')
        {
            let name = t.text[1..t.text.len() - 1].to_owned();
            if line_end - i != 2 || !tokens[i + 1].is("{") {
                return Err(p.err(
                    t.line,
                    format!("snippet ({name}) needs a block: ({name}) {{"),
                ));
            }
            let mut open = 1;
            let mut k = line_end;
            while k < tokens.len() {
                if tokens[k].is("{") {
                    open += 1;
                } else if tokens[k].is("}") {
                    open -= 1;
                    if open == 0 {
                        break;
                    }
                }
                k += 1;
            }
            if k == tokens.len() {
                return Err(p.err(t.line, "this { is never closed"));
            }
            snippets.insert(name, tokens[line_end..k].to_vec());
            i = k + 1;
            continue;
        }
        if line_start && t.is("import") {
            if depth >= MAX_IMPORT_DEPTH {
                return Err(p.err(t.line, "imports nest too deep (does a file import itself?)"));
            }
            let args: Vec<String> = tokens[i + 1..line_end]
                .iter()
                .map(|a| a.text.clone())
                .collect();
            let Some((what, args)) = args.split_first() else {
                return Err(p.err(t.line, "import needs a snippet name or a file"));
            };
            let imported = match snippets.get(what) {
                Some(body) => instantiate(p, body, args),
                None => import_files(p, t.line, what, args, env)?,
            };
            out.extend(expand(p, imported, env, depth + 1, snippets)?);
            i = line_end;
            continue;
        }
        if t.is("{") {
            level += 1;
        } else if t.is("}") {
            level = level.saturating_sub(1);
        }
        out.push(t.clone());
        i += 1;
    }
    Ok(out)
}

/// A copy of `body` with locations of its own and `{args[N]}`/`{args.N}` replaced.
fn instantiate(p: &Parser<'_>, body: &[Token], args: &[String]) -> Vec<Token> {
    let mut fresh: BTreeMap<usize, usize> = BTreeMap::new();
    let mut out = Vec::with_capacity(body.len());
    for t in body {
        let line = *fresh.entry(t.line).or_insert_with(|| p.copy(t.line));
        if !t.quoted && (t.text == "{args[:]}" || t.text == "{args.*}") {
            for a in args {
                out.push(Token {
                    text: a.clone(),
                    line,
                    quoted: true,
                });
            }
            continue;
        }
        let mut text = t.text.clone();
        if text.contains("{args") {
            for (n, a) in args.iter().enumerate() {
                text = text
                    .replace(&format!("{{args[{n}]}}"), a)
                    .replace(&format!("{{args.{n}}}"), a);
            }
        }
        out.push(Token {
            text,
            line,
            quoted: t.quoted,
        });
    }
    out
}

/// The tokens of the files `pattern` names (relative to the importing file; `*` globs the
/// file name), in name order.
fn import_files(
    p: &Parser<'_>,
    loc: usize,
    pattern: &str,
    args: &[String],
    env: &Env,
) -> Result<Vec<Token>, CaddyfileError> {
    let (from, _) = p.place(loc);
    let base = from.parent().unwrap_or(Path::new("."));
    let full = base.join(pattern);
    let files = if pattern.contains('*') {
        let dir = full.parent().unwrap_or(base).to_owned();
        let name = full
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if dir.to_string_lossy().contains('*') {
            return Err(p.err(
                loc,
                format!("import {pattern}: only the file name may hold *"),
            ));
        }
        let mut found: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|f| {
                    f.file_name()
                        .is_some_and(|n| glob_name(name.as_bytes(), n.as_encoded_bytes()))
                })
                .filter(|f| f.is_file())
                .collect(),
            // Caddy takes a glob matching nothing as nothing to import.
            Err(_) => Vec::new(),
        };
        found.sort();
        found
    } else {
        vec![full]
    };
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| p.err(loc, format!("import {}: {e}", file.display())))?;
        let tokens = tokenize(p, &text, env).map_err(|e| match e {
            CaddyfileError::At { line, message, .. } => CaddyfileError::At {
                path: file.clone(),
                line,
                message,
            },
            other => other,
        })?;
        let mut fresh: BTreeMap<usize, usize> = BTreeMap::new();
        let mut local = Vec::with_capacity(tokens.len());
        for t in tokens {
            let line = *fresh.entry(t.line).or_insert_with(|| {
                let mut locs = p.locs.borrow_mut();
                locs.push((file.clone(), t.line));
                locs.len() - 1
            });
            local.push(Token { line, ..t });
        }
        out.extend(instantiate(p, &local, args));
    }
    Ok(out)
}

/// A file name glob: `*` matches any run of bytes.
fn glob_name(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| glob_name(rest, &name[i..])),
        Some((c, rest)) => name.first() == Some(c) && glob_name(rest, &name[1..]),
    }
}

/// Parses Caddyfile text that came from `path` (named in errors); `{$VAR}` reads `env`.
pub(crate) fn parse(path: &Path, text: &str, env: &Env) -> Result<Parsed, CaddyfileError> {
    let lines_in_file = text.lines().count() + 2;
    let p = Parser {
        path,
        locs: std::cell::RefCell::new((0..lines_in_file).map(|n| (path.to_owned(), n)).collect()),
    };
    let tokens = tokenize(&p, text, env)?;
    let tokens = expand(&p, tokens, env, 0, &mut BTreeMap::new())?;
    let mut pos = 0;
    let nodes = tree(&p, &tokens, &mut pos, None)?;
    let mut toml = EdgeToml::default();
    let mut lines = BTreeMap::new();
    let mut nodes = nodes.into_iter().peekable();
    if let Some(first) = nodes.peek()
        && first.tokens.is_empty()
    {
        let global = nodes.next().expect("peeked");
        globals(&p, global.block.unwrap_or_default(), &mut toml, &mut lines)?;
    }
    let rest: Vec<Node> = nodes.collect();
    // A Caddyfile with a single site may leave out its braces.
    if let Some(first) = rest.first()
        && first.block.is_none()
    {
        let mut rest = rest.into_iter();
        let head = rest.next().expect("checked non-empty");
        let body: Vec<Node> = rest.collect();
        if let Some(bare) = body.iter().find(|n| n.tokens.is_empty()) {
            return Err(p.err(
                bare.line,
                "the global options block must come first and only once",
            ));
        }
        if let Some(block) = body.iter().find(|n| n.block.is_some() && is_site_like(n)) {
            return Err(p.err(
                block.line,
                "a Caddyfile whose first site has no braces can hold only that site",
            ));
        }
        let site = site(&p, head.tokens, head.line, body, 0, &mut lines)?;
        toml.sites.push(site);
    } else {
        for (i, node) in rest.into_iter().enumerate() {
            if node.tokens.is_empty() {
                return Err(p.err(
                    node.line,
                    "the global options block must come first and only once",
                ));
            }
            let block = node.block.unwrap_or_default();
            let site = site(&p, node.tokens, node.line, block, i, &mut lines)?;
            toml.sites.push(site);
        }
    }
    Ok(Parsed {
        toml,
        lines,
        locs: p.locs.into_inner(),
    })
}

fn is_site_like(node: &Node) -> bool {
    node.tokens
        .first()
        .is_some_and(|t| t.text.contains('.') || t.text.contains(':'))
}

/// Splits text into tokens, substituting `{$VAR}` first.
fn tokenize(p: &Parser<'_>, text: &str, env: &Env) -> Result<Vec<Token>, CaddyfileError> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    let mut at_token_start = true;
    while let Some(&c) = chars.peek() {
        if c == '\n' {
            line += 1;
            chars.next();
            at_token_start = true;
            continue;
        }
        if c.is_whitespace() {
            chars.next();
            at_token_start = true;
            continue;
        }
        if c == '#' && at_token_start {
            while let Some(&c) = chars.peek() {
                if c == '\n' {
                    break;
                }
                chars.next();
            }
            continue;
        }
        let start_line = line;
        let mut word = String::new();
        let mut quoted = false;
        if c == '"' || c == '`' {
            quoted = true;
            let close = c;
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(p.err(start_line, "unterminated quoted string")),
                    Some('\\') if close == '"' => match chars.next() {
                        Some('"') => word.push('"'),
                        Some('\\') => word.push('\\'),
                        Some(other) => {
                            word.push('\\');
                            word.push(other);
                        }
                        None => return Err(p.err(start_line, "unterminated quoted string")),
                    },
                    Some(c) if c == close => break,
                    Some(c) => {
                        if c == '\n' {
                            line += 1;
                        }
                        word.push(c);
                    }
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        at_token_start = false;
        let text = substitute(p, &word, start_line, env)?;
        tokens.push(Token {
            text,
            line: start_line,
            quoted,
        });
    }
    Ok(tokens)
}

/// Replaces `{$VAR}` and `{$VAR:default}` with the environment's values.
fn substitute(
    p: &Parser<'_>,
    word: &str,
    line: usize,
    env: &Env,
) -> Result<String, CaddyfileError> {
    let mut out = String::with_capacity(word.len());
    let mut rest = word;
    while let Some(start) = rest.find("{$") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| {
            p.err(
                line,
                format!("unclosed environment placeholder in {word:?}"),
            )
        })?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(':') {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match (env.get(name), default) {
            (Some(value), _) => out.push_str(value),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(p.err(
                    line,
                    format!("environment variable {name} is not set (write {{${name}:default}})"),
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Groups tokens into lines and nested blocks.
fn tree(
    p: &Parser<'_>,
    tokens: &[Token],
    pos: &mut usize,
    opened_at: Option<usize>,
) -> Result<Vec<Node>, CaddyfileError> {
    let mut nodes = Vec::new();
    loop {
        let Some(first) = tokens.get(*pos) else {
            return match opened_at {
                Some(line) => Err(p.err(line, "this { is never closed")),
                None => Ok(nodes),
            };
        };
        let line = first.line;
        let end = tokens[*pos..]
            .iter()
            .position(|t| t.line != line)
            .map_or(tokens.len(), |n| *pos + n);
        let mut words: Vec<Token> = tokens[*pos..end].to_vec();
        *pos = end;
        if words[0].is("}") {
            if words.len() > 1 {
                return Err(p.err(line, "a closing } must be alone on its line"));
            }
            return match opened_at {
                Some(_) => Ok(nodes),
                None => Err(p.err(line, "unexpected }: no block is open")),
            };
        }
        let opens = words.last().is_some_and(|t| t.is("{"));
        if opens {
            words.pop();
        }
        if let Some(brace) = words.iter().find(|t| t.is("{") || t.is("}")) {
            return Err(p.err(
                brace.line,
                format!("unexpected {brace}: a block opens at the end of a line and closes on a line of its own"),
            ));
        }
        // A bare `{` line is the global options block at the top level and nothing anywhere
        // else: every directive below reads its name from its first word.
        if words.is_empty() && opened_at.is_some() {
            return Err(p.err(line, "a block must open at the end of a directive's line"));
        }
        let block = if opens {
            Some(tree(p, tokens, pos, Some(line))?)
        } else {
            None
        };
        nodes.push(Node {
            tokens: words,
            line,
            block,
        });
    }
}

/// `storage s3 { bucket …; prefix …; endpoint …; … }`. certmagic-s3's names (`host`,
/// `access_key`, `secret_key`) are read as `endpoint`, `access_key_id`, `secret_access_key`.
fn storage_s3(p: &Parser<'_>, node: &Node) -> Result<crate::config::StorageS3Toml, CaddyfileError> {
    let usage = "storage s3 { bucket NAME; prefix P; endpoint URL; region R; access_key_id ID; \
                 secret_access_key_file FILE; encryption_key_file FILE; lease D; poll_interval D }";
    let (Some(block), 1) = (&node.block, node.tokens.len()) else {
        return Err(p.err(node.line, usage));
    };
    let mut t = crate::config::StorageS3Toml::default();
    for n in block {
        let [key, value] = n.tokens.as_slice() else {
            return Err(p.err(
                n.line,
                format!("storage s3: each line is KEY VALUE ({usage})"),
            ));
        };
        if n.block.is_some() {
            return Err(p.err(n.line, "storage s3: no blocks inside"));
        }
        let v = Some(value.text.clone());
        match key.text.as_str() {
            "bucket" => t.bucket = v,
            "prefix" => t.prefix = v,
            "endpoint" | "host" => t.endpoint = v,
            "region" => t.region = v,
            "access_key_id" | "access_key" | "access_id" => t.access_key_id = v,
            "secret_access_key" | "secret_key" => {
                t.secret_access_key = Some(labcore::secret::Secret::new(value.text.clone()));
            }
            "secret_access_key_file" => t.secret_access_key_file = v.map(PathBuf::from),
            "ca_bundle" => t.ca_bundle = v.map(PathBuf::from),
            "path_style" => {
                t.path_style = Some(match value.text.as_str() {
                    "true" | "on" => true,
                    "false" | "off" => false,
                    other => {
                        return Err(p.err(
                            n.line,
                            format!("path_style: {other:?} is not true or false"),
                        ));
                    }
                });
            }
            "encryption_key_file" => t.encryption_key_file = v.map(PathBuf::from),
            "encryption_key" => {
                return Err(p.err(
                    n.line,
                    "storage s3: give the key as encryption_key_file FILE (mode 0600), never inline",
                ));
            }
            "lease" => t.lease = v,
            "poll_interval" => t.poll_interval = v,
            other => {
                return Err(p.err(
                    n.line,
                    format!("storage s3: unknown option {other:?} ({usage})"),
                ));
            }
        }
    }
    Ok(t)
}

fn globals(
    p: &Parser<'_>,
    nodes: Vec<Node>,
    toml: &mut EdgeToml,
    lines: &mut BTreeMap<String, usize>,
) -> Result<(), CaddyfileError> {
    for node in nodes {
        let name = node.tokens[0].text.as_str();
        let args = &node.tokens[1..];
        let one = |what: &str| -> Result<String, CaddyfileError> {
            match args {
                [value] if node.block.is_none() => Ok(value.text.clone()),
                _ => Err(p.err(node.line, format!("{name} takes one {what}"))),
            }
        };
        let port = |what: &str| -> Result<u16, CaddyfileError> {
            let text = one(what)?;
            text.parse()
                .map_err(|_| p.err(node.line, format!("{name}: {text:?} is not a port")))
        };
        lines.insert(name.to_owned(), node.line);
        match name {
            "email" => toml.email = Some(one("address")?),
            "http_port" => toml.http_port = Some(port("port")?),
            "https_port" => toml.https_port = Some(port("port")?),
            "grace_period" => toml.grace_period = Some(one("duration")?),
            "acme_ca" => toml.acme_ca = Some(one("directory URL")?),
            "acme_ca_root" => toml.acme_ca_root = Some(PathBuf::from(one("PEM file")?)),
            "key_type" => toml.key_type = Some(one("key type")?),
            "acme_eab" => toml.acme_eab = Some(acme_eab(p, &node)?),
            "renewal_window_ratio" => {
                let text = one("ratio")?;
                lines.insert("acme.renewal_window_ratio".into(), node.line);
                toml.acme.renewal_window_ratio =
                    Some(text.parse().map_err(|_| {
                        p.err(node.line, format!("{name}: {text:?} is not a number"))
                    })?);
            }
            // labkit's own: which challenges to offer, and the first retry delay.
            "acme_challenges" => {
                if args.is_empty() || node.block.is_some() {
                    return Err(p.err(
                        node.line,
                        "acme_challenges takes one or more of http-01, tls-alpn-01",
                    ));
                }
                lines.insert("acme.challenges".into(), node.line);
                toml.acme.challenges = args.iter().map(|t| t.text.clone()).collect();
            }
            "acme_retry_base" => {
                lines.insert("acme.retry_base".into(), node.line);
                toml.acme.retry_base = Some(one("duration")?);
            }
            "default_bind" => {
                if args.is_empty() || node.block.is_some() {
                    return Err(p.err(node.line, "default_bind takes one or more addresses"));
                }
                lines.insert("bind".into(), node.line);
                toml.bind = args.iter().map(|t| t.text.clone()).collect();
            }
            "admin" => {
                if node.block.is_some() {
                    return Err(p.err(
                        node.line,
                        "admin options (origins, enforce_origin, config) are not supported: the admin endpoint allows loopback origins only",
                    ));
                }
                toml.admin = Some(one("address")?);
            }
            "debug" => {
                if !args.is_empty() || node.block.is_some() {
                    return Err(p.err(node.line, "debug takes nothing"));
                }
                toml.debug = Some(true);
            }
            "storage" if args.first().is_some_and(|a| a.text == "s3") => {
                toml.storage_s3 = Some(storage_s3(p, &node)?);
            }
            "storage" => {
                let root = match (args, &node.block) {
                    ([kind, root], None) if kind.text == "file_system" => root.text.clone(),
                    ([kind], Some(block)) if kind.text == "file_system" => match block.as_slice() {
                        [n] if n.tokens.len() == 2 && n.tokens[0].text == "root" => {
                            n.tokens[1].text.clone()
                        }
                        _ => return Err(p.err(node.line, "storage file_system { root PATH }")),
                    },
                    _ => {
                        return Err(
                            p.err(node.line, "only `storage file_system PATH` is supported")
                        );
                    }
                };
                toml.storage = Some(PathBuf::from(root));
            }
            "log" => {
                if toml.log.is_some() {
                    return Err(p.err(node.line, "global log given twice"));
                }
                let log = log_block(p, node.line, args, node.block.clone())?;
                if log.name.as_deref().is_some_and(|n| n != "default") {
                    return Err(p.err(
                        node.line,
                        "only the default logger can be configured globally (`log { ... }` or `log default { ... }`)",
                    ));
                }
                toml.log = Some(config::LogToml { name: None, ..log });
            }
            "auto_https" => {
                let mode = one("mode")?;
                match mode.as_str() {
                    "off" | "disable_redirects" | "disable_certs" | "ignore_loaded_certs" => {
                        toml.auto_https = Some(mode)
                    }
                    other => {
                        return Err(p.err(
                            node.line,
                            format!("auto_https {other:?}: write off, disable_redirects, disable_certs or ignore_loaded_certs"),
                        ));
                    }
                }
            }
            "servers" => servers(p, node.line, args, node.block.clone(), toml)?,
            "local_certs" => {
                if !args.is_empty() || node.block.is_some() {
                    return Err(p.err(node.line, "local_certs takes nothing"));
                }
                toml.local_certs = Some(true);
            }
            // The edge never installs its root into a trust store unless `edge ca trust` is
            // run, so there is nothing to skip.
            "skip_install_trust" => {
                if !args.is_empty() || node.block.is_some() {
                    return Err(p.err(node.line, "skip_install_trust takes nothing"));
                }
            }
            "on_demand_tls" => {
                if !args.is_empty() {
                    return Err(p.err(node.line, "on_demand_tls takes a block only"));
                }
                let mut od = config::OnDemandToml::default();
                for o in node.block.iter().flatten() {
                    let words: Vec<&str> = o.tokens.iter().map(|t| t.text.as_str()).collect();
                    match words.as_slice() {
                        ["ask", url] => {
                            lines.insert("on_demand_tls.ask".into(), o.line);
                            od.ask = Some((*url).to_owned());
                        }
                        ["interval", d] => {
                            lines.insert("on_demand_tls.interval".into(), o.line);
                            od.interval = Some((*d).to_owned());
                        }
                        ["burst", n] => {
                            lines.insert("on_demand_tls.burst".into(), o.line);
                            od.burst = Some(n.parse().map_err(|_| {
                                p.err(o.line, format!("burst: {n:?} is not a number"))
                            })?);
                        }
                        _ => {
                            return Err(p.err(
                                o.line,
                                format!("on_demand_tls option {:?} is not supported (ask, interval and burst are)", words.join(" ")),
                            ));
                        }
                    }
                }
                if od == config::OnDemandToml::default() {
                    return Err(p.err(
                        node.line,
                        "on_demand_tls needs at least one of ask, interval, burst",
                    ));
                }
                toml.on_demand_tls = Some(od);
            }
            "order" => {
                let words: Vec<&str> = args.iter().map(|t| t.text.as_str()).collect();
                if node.block.is_some() {
                    return Err(p.err(node.line, "order takes no block"));
                }
                // Checked here too, so the error names this line.
                let mut order = crate::directives::Order::default();
                order.place(&words).map_err(|m| p.err(node.line, m))?;
                if !toml.order.is_empty() {
                    return Err(p.err(node.line, "order: rate_limit is ordered twice"));
                }
                lines.insert(format!("order[{}]", toml.order.len()), node.line);
                toml.order.push(words.join(" "));
            }
            "acme_dns" => {
                lines.insert("acme.dns".into(), node.line);
                let provider = dns_provider(p, node.line, args, node.block.as_deref())?;
                toml.acme.dns = Some(provider);
            }
            other => {
                return Err(p.err(
                    node.line,
                    format!("global option {other:?} is not supported"),
                ));
            }
        }
    }
    Ok(())
}

/// A line's words, quotes removed, except in an `expression` matcher of several words, which
/// Caddy joins as written (so `{method} == "GET"` keeps its string's quotes).
fn words_of(tokens: Vec<Token>) -> Vec<String> {
    let at = match tokens.first() {
        Some(t) if t.is("expression") => 1,
        Some(t) if t.text.starts_with('@') && tokens.get(1).is_some_and(|t| t.is("expression")) => {
            2
        }
        _ => return tokens.into_iter().map(|t| t.text).collect(),
    };
    if tokens.len() - at < 2 {
        return tokens.into_iter().map(|t| t.text).collect();
    }
    tokens
        .into_iter()
        .map(|t| {
            if t.quoted {
                format!("\"{}\"", t.text)
            } else {
                t.text
            }
        })
        .collect()
}

/// The `servers { ... }` global option: the parts the edge has, applied to every listener.
fn servers(
    p: &Parser<'_>,
    line: usize,
    args: &[Token],
    block: Option<Vec<Node>>,
    toml: &mut EdgeToml,
) -> Result<(), CaddyfileError> {
    if !args.is_empty() {
        return Err(p.err(
            line,
            "servers with a listener address is not supported: the edge's server options apply to every listener (write `servers { ... }`)",
        ));
    }
    // The first option that means nothing without trusted_proxies, if any.
    let mut needs_trust: Option<(usize, String)> = None;
    for node in block.unwrap_or_default() {
        let name = node.tokens[0].text.as_str();
        let args: Vec<&str> = node.tokens[1..].iter().map(|t| t.text.as_str()).collect();
        let line = node.line;
        match name {
            "protocols" => {
                let mut wanted: Vec<&str> = args.clone();
                wanted.sort_unstable();
                match wanted.as_slice() {
                    ["h1", "h2"] => toml.limits.http3 = Some(false),
                    ["h1", "h2", "h3"] => toml.limits.http3 = None,
                    _ => {
                        return Err(p.err(
                            line,
                            "servers protocols: only `h1 h2 h3` (the edge's default) and `h1 h2` (no HTTP/3) are supported",
                        ));
                    }
                }
            }
            "timeouts" => {
                for t in node.block.iter().flatten() {
                    let words: Vec<&str> = t.tokens.iter().map(|t| t.text.as_str()).collect();
                    match words.as_slice() {
                        ["read_header", d] => {
                            toml.limits.header_read_timeout = Some((*d).to_owned())
                        }
                        ["idle", d] => toml.limits.idle_timeout = Some((*d).to_owned()),
                        ["read_body", d] => toml.limits.read_body_timeout = Some((*d).to_owned()),
                        ["write", d] => toml.limits.write_timeout = Some((*d).to_owned()),
                        [other, ..] => {
                            return Err(p.err(
                                t.line,
                                format!("servers timeouts {other:?} is not supported (read_body, read_header, write and idle are)"),
                            ));
                        }
                        [] => {}
                    }
                }
            }
            "max_header_size" => match args.as_slice() {
                [size] => {
                    let bytes = parse_bytes(size).ok_or_else(|| {
                        p.err(line, format!("max_header_size: {size:?} is not a size"))
                    })?;
                    toml.limits.max_header_bytes = Some(bytes as usize);
                }
                _ => return Err(p.err(line, "max_header_size takes one size")),
            },
            "metrics" if args.is_empty() && node.block.is_none() => toml.metrics = Some(true),
            "trusted_proxies" => match args.split_first() {
                Some((&"static", ranges)) if !ranges.is_empty() && node.block.is_none() => {
                    for range in ranges {
                        crate::matchers::Cidr::parse(range)
                            .map_err(|m| p.err(line, format!("trusted_proxies: {m}")))?;
                    }
                    toml.client_ip.trusted_proxies =
                        ranges.iter().map(|r| (*r).to_owned()).collect();
                }
                Some((source, _)) if *source != "static" => {
                    return Err(p.err(
                        line,
                        format!("trusted_proxies source {source:?} is not supported (static is)"),
                    ));
                }
                _ => return Err(p.err(line, "trusted_proxies static takes the ranges on its line")),
            },
            "trusted_proxies_strict" if args.is_empty() => {
                toml.client_ip.strict = true;
                needs_trust.get_or_insert((line, name.to_owned()));
            }
            "client_ip_headers" if !args.is_empty() => {
                needs_trust.get_or_insert((line, name.to_owned()));
                for header in &args {
                    if hyper::http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                        return Err(p.err(
                            line,
                            format!("client_ip_headers: {header:?} is not a header name"),
                        ));
                    }
                    if !toml
                        .client_ip
                        .headers
                        .iter()
                        .any(|h| h.eq_ignore_ascii_case(header))
                    {
                        toml.client_ip.headers.push((*header).to_owned());
                    }
                }
            }
            "listener_wrappers" if args.is_empty() => {
                toml.proxy_protocol =
                    listener_wrappers(p, node.block.as_deref().unwrap_or_default())?;
            }
            other => {
                return Err(p.err(line, format!("servers option {other:?} is not supported")));
            }
        }
    }
    if let Some((line, name)) = needs_trust
        && toml.client_ip.trusted_proxies.is_empty()
    {
        return Err(p.err(
            line,
            format!("servers {name} needs trusted_proxies: only trusted peers' headers are read"),
        ));
    }
    Ok(())
}

/// `listener_wrappers { proxy_protocol { timeout D; allow CIDR... } tls }` (Caddy 2.7's
/// spelling): the PROXY header is read before TLS, so `tls` must follow `proxy_protocol`.
fn listener_wrappers(
    p: &Parser<'_>,
    wrappers: &[Node],
) -> Result<Option<crate::proxy_protocol::Toml>, CaddyfileError> {
    let mut proxy_protocol = None;
    let mut tls_seen = false;
    for w in wrappers {
        let name = w.tokens[0].text.as_str();
        match name {
            "tls" if w.tokens.len() == 1 && w.block.is_none() => {
                if tls_seen || proxy_protocol.is_none() {
                    return Err(p.err(
                        w.line,
                        "listener_wrappers: tls goes once, after proxy_protocol (first is Caddy's default)",
                    ));
                }
                tls_seen = true;
            }
            "proxy_protocol" if w.tokens.len() == 1 => {
                if tls_seen || proxy_protocol.is_some() {
                    return Err(p.err(
                        w.line,
                        "listener_wrappers: proxy_protocol goes once, before tls (the edge reads PROXY headers before TLS only)",
                    ));
                }
                let mut pp = crate::proxy_protocol::Toml::default();
                for o in w.block.as_deref().unwrap_or_default() {
                    let words: Vec<&str> = o.tokens.iter().map(|t| t.text.as_str()).collect();
                    match words.as_slice() {
                        ["timeout", d] => pp.timeout = Some((*d).to_owned()),
                        ["allow", ranges @ ..] if !ranges.is_empty() => {
                            pp.allow.extend(ranges.iter().map(|r| (*r).to_owned()));
                        }
                        _ => {
                            return Err(p.err(
                                o.line,
                                format!("proxy_protocol option {:?} is not supported (timeout D, allow CIDR...)", words.join(" ")),
                            ));
                        }
                    }
                }
                crate::proxy_protocol::Settings::build(&pp).map_err(|m| p.err(w.line, m))?;
                proxy_protocol = Some(pp);
            }
            other => {
                return Err(p.err(
                    w.line,
                    format!("listener wrapper {other:?} is not supported (proxy_protocol {{...}} then tls)"),
                ));
            }
        }
    }
    if proxy_protocol.is_some() && !tls_seen {
        return Err(p.err(
            wrappers.first().map_or(0, |w| w.line),
            "listener_wrappers: write tls after proxy_protocol (without it Caddy reads the PROXY header inside TLS, which the edge does not)",
        ));
    }
    Ok(proxy_protocol)
}

/// A byte size as Caddy reads one ("16KB" is 16000 bytes, "1MiB" 1048576, "512" bytes).
fn parse_bytes(text: &str) -> Option<u64> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "kib" | "ki" => 1 << 10,
        "mb" | "m" => 1_000_000,
        "mib" | "mi" => 1 << 20,
        "gb" | "g" => 1_000_000_000,
        "gib" | "gi" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(scale)
}

/// A `log [NAME] { output ...; format ...; level ... }` block, site or global.
fn log_block(
    p: &Parser<'_>,
    line: usize,
    args: &[Token],
    block: Option<Vec<Node>>,
) -> Result<config::LogToml, CaddyfileError> {
    let mut log = config::LogToml::default();
    match args {
        [] => {}
        [name] => log.name = Some(name.text.clone()),
        _ => return Err(p.err(line, "log takes at most a logger name, then a block")),
    }
    for node in block.unwrap_or_default() {
        let name = node.tokens[0].text.as_str();
        let args: Vec<&str> = node.tokens[1..].iter().map(|t| t.text.as_str()).collect();
        let line = node.line;
        let no_block = |what: &str| {
            if node.block.is_some() {
                Err(p.err(line, format!("log {what} takes no block here")))
            } else {
                Ok(())
            }
        };
        match (name, args.as_slice()) {
            ("output", ["stdout" | "stderr" | "discard"]) => {
                no_block("output")?;
                log.output = Some(args[0].to_owned());
            }
            ("output", ["file", path]) => {
                log.output = Some((*path).to_owned());
                for option in node.block.iter().flatten() {
                    let words: Vec<&str> = option.tokens.iter().map(|t| t.text.as_str()).collect();
                    let bad = || {
                        p.err(
                            option.line,
                            format!("output file option {:?} is not supported", words.join(" ")),
                        )
                    };
                    match words.as_slice() {
                        ["roll_size", size] => log.roll_size = Some((*size).to_owned()),
                        ["roll_keep", n] => {
                            log.roll_keep = Some(n.parse().map_err(|_| {
                                p.err(option.line, format!("roll_keep: {n:?} is not a number"))
                            })?)
                        }
                        ["roll_keep_for", d] => log.roll_keep_for = Some((*d).to_owned()),
                        ["roll_local_time"] => log.roll_local_time = Some(true),
                        ["roll_disabled"] => log.roll_disabled = Some(true),
                        // The edge never compresses rolled files.
                        ["roll_uncompressed"] => {}
                        _ => return Err(bad()),
                    }
                }
            }
            ("output", _) => {
                return Err(p.err(
                    line,
                    "log output: only stdout, stderr, discard and `file PATH` are supported",
                ));
            }
            ("format", ["json" | "console"]) => {
                no_block("format")?;
                log.format = Some(args[0].to_owned());
            }
            ("format", _) => {
                return Err(p.err(
                    line,
                    "log format: only `json` and `console`, without options, are supported",
                ));
            }
            ("level", [level]) => {
                no_block("level")?;
                log.level = Some((*level).to_owned());
            }
            (other, _) => {
                return Err(p.err(line, format!("log option {other:?} is not supported")));
            }
        }
    }
    Ok(log)
}

/// `dns PROVIDER [ARGS] [{ ... }]` (in `tls`) or `acme_dns PROVIDER ...` (global): the
/// provider's options as the `DnsToml` keys.
fn dns_provider(
    p: &Parser<'_>,
    line: usize,
    args: &[Token],
    block: Option<&[Node]>,
) -> Result<DnsToml, CaddyfileError> {
    let Some((name, rest)) = args.split_first() else {
        return Err(p.err(
            line,
            "dns takes a provider: rfc2136, cloudflare, desec or exec",
        ));
    };
    let mut dns = DnsToml {
        provider: Some(name.text.clone()),
        ..DnsToml::default()
    };
    let rest: Vec<String> = rest.iter().map(|t| t.text.clone()).collect();
    let options = block.unwrap_or_default();
    let option = |n: &Node| -> (String, Vec<String>) {
        let words: Vec<String> = n.tokens.iter().map(|t| t.text.clone()).collect();
        (words[0].clone(), words[1..].to_vec())
    };
    let refuse = |n: &Node, allowed: &str| {
        let (opt, _) = option(n);
        p.err(
            n.line,
            format!(
                "dns {} option {opt:?} is not supported ({allowed})",
                name.text
            ),
        )
    };
    match name.text.as_str() {
        "rfc2136" => {
            if !rest.is_empty() {
                return Err(p.err(line, "dns rfc2136 takes its options in a block"));
            }
            for n in options {
                match option(n) {
                    (o, v) if v.len() == 1 && n.block.is_none() => {
                        let value = v[0].clone();
                        match o.as_str() {
                            "key_name" => dns.key_name = Some(value),
                            "key_alg" => dns.key_alg = Some(value),
                            "key" => dns.key = Some(SecretText::new(value)),
                            "server" => dns.server = Some(value),
                            _ => return Err(refuse(n, "key_name, key_alg, key and server are")),
                        }
                    }
                    _ => {
                        return Err(refuse(
                            n,
                            "each of key_name, key_alg, key and server takes one value",
                        ));
                    }
                }
            }
        }
        "cloudflare" | "desec" => {
            let token_key = if name.text == "cloudflare" {
                "api_token"
            } else {
                "token"
            };
            match rest.as_slice() {
                [] => {}
                [token] => dns.token = Some(SecretText::new(token.clone())),
                _ => return Err(p.err(line, format!("dns {} takes one token", name.text))),
            }
            for n in options {
                match option(n) {
                    (o, v) if o == token_key && v.len() == 1 && n.block.is_none() => {
                        dns.token = Some(SecretText::new(v[0].clone()));
                    }
                    _ => return Err(refuse(n, &format!("{token_key} TOKEN is"))),
                }
            }
        }
        "exec" => {
            dns.command = rest;
            for n in options {
                match option(n) {
                    (o, v) if o == "env" && v.len() == 2 && n.block.is_none() => {
                        dns.env.insert(v[0].clone(), SecretText::new(v[1].clone()));
                    }
                    _ => return Err(refuse(n, "env NAME VALUE is")),
                }
            }
        }
        other => {
            return Err(p.err(
                line,
                format!("DNS provider {other:?} is not supported (rfc2136, cloudflare, desec and exec are)"),
            ));
        }
    }
    Ok(dns)
}

/// `propagation_delay`, `propagation_timeout`, `resolvers` and `dns` of a `tls` (or
/// `issuer acme`) block into the site's `tls_dns`; false when `words` is none of them.
fn tls_dns_option(
    p: &Parser<'_>,
    key: &str,
    n: &Node,
    site: &mut SiteToml,
    lines: &mut BTreeMap<String, usize>,
) -> Result<bool, CaddyfileError> {
    let words: Vec<&str> = n.tokens.iter().map(|t| t.text.as_str()).collect();
    let dns = site.tls_dns.get_or_insert_with(DnsToml::default);
    let one = |what: &str| -> Result<String, CaddyfileError> {
        match words.as_slice() {
            [_, value] if n.block.is_none() => Ok((*value).to_owned()),
            _ => Err(p.err(n.line, format!("{} takes one {what}", words[0]))),
        }
    };
    match words[0] {
        "dns" => {
            let provider = dns_provider(p, n.line, &n.tokens[1..], n.block.as_deref())?;
            if dns.provider.is_some() {
                return Err(p.err(n.line, "dns given twice in one site"));
            }
            let keep = std::mem::take(dns);
            *dns = DnsToml {
                propagation_delay: keep.propagation_delay,
                propagation_timeout: keep.propagation_timeout,
                resolvers: keep.resolvers,
                ..provider
            };
            lines.insert(format!("{key}.tls_dns"), n.line);
        }
        "propagation_delay" => {
            dns.propagation_delay = Some(one("duration")?);
            lines.insert(format!("{key}.tls_dns.propagation_delay"), n.line);
        }
        "propagation_timeout" => {
            dns.propagation_timeout = Some(one("duration (or -1)")?);
            lines.insert(format!("{key}.tls_dns.propagation_timeout"), n.line);
        }
        "resolvers" => {
            if words.len() < 2 || n.block.is_some() {
                return Err(p.err(n.line, "resolvers takes one or more DNS servers"));
            }
            dns.resolvers = words[1..].iter().map(|w| (*w).to_owned()).collect();
            lines.insert(format!("{key}.tls_dns.resolvers"), n.line);
        }
        _ => {
            if dns.is_empty() {
                site.tls_dns = None;
            }
            return Ok(false);
        }
    }
    Ok(true)
}

/// The block of `tls [ARGS] { ... }`: issuers, DNS-01 and client_auth.
/// `acme_eab { key_id ID; mac_key KEY }`.
fn acme_eab(p: &Parser<'_>, node: &Node) -> Result<crate::issuer::EabToml, CaddyfileError> {
    let usage = "acme_eab takes a block: { key_id ID; mac_key KEY }";
    let (true, Some(block)) = (node.tokens.len() == 1, &node.block) else {
        return Err(p.err(node.line, usage));
    };
    let mut eab = crate::issuer::EabToml::default();
    for n in block {
        let words: Vec<&str> = n.tokens.iter().map(|t| t.text.as_str()).collect();
        match (words.as_slice(), &n.block) {
            (["key_id", id], None) => eab.key_id = (*id).to_owned(),
            (["mac_key", key], None) => eab.mac_key = Some(SecretText::new((*key).to_owned())),
            _ => return Err(p.err(n.line, usage)),
        }
    }
    if eab.key_id.is_empty() || eab.mac_key.is_none() {
        return Err(p.err(node.line, usage));
    }
    Ok(eab)
}

fn tls_block(
    p: &Parser<'_>,
    key: &str,
    block: &[Node],
    site: &mut SiteToml,
    lines: &mut BTreeMap<String, usize>,
) -> Result<(), CaddyfileError> {
    for n in block {
        if tls_dns_option(p, key, n, site, lines)? {
            continue;
        }
        let words: Vec<&str> = n.tokens.iter().map(|t| t.text.as_str()).collect();
        match (words.as_slice(), &n.block) {
            (["issuer", "internal"], None) => site.tls = Some("internal".into()),
            (["ca", url], None) => {
                lines.insert(format!("{key}.tls_ca"), n.line);
                site.tls_ca = Some((*url).to_owned());
            }
            (["ca_root", file], None) => {
                lines.insert(format!("{key}.tls_ca_root"), n.line);
                site.tls_ca_root = Some(PathBuf::from(file));
            }
            (["key_type", kind], None) => {
                lines.insert(format!("{key}.tls_key_type"), n.line);
                site.tls_key_type = Some((*kind).to_owned());
            }
            (["eab", key_id, mac_key], None) => {
                lines.insert(format!("{key}.tls_eab"), n.line);
                site.tls_eab = Some(crate::issuer::EabToml {
                    key_id: (*key_id).to_owned(),
                    mac_key: Some(SecretText::new((*mac_key).to_owned())),
                    mac_key_file: None,
                });
            }
            // Never echoed back: the words hold the MAC key.
            (["eab", ..], _) => {
                return Err(p.err(n.line, "tls eab takes KEY_ID MAC_KEY"));
            }
            (["on_demand"], None) => {
                lines.insert(format!("{key}.tls_on_demand"), n.line);
                site.tls_on_demand = Some(true);
            }
            (
                [
                    option @ ("protocols" | "ciphers" | "curves" | "alpn"),
                    values @ ..,
                ],
                None,
            ) => {
                if values.is_empty() {
                    return Err(p.err(n.line, format!("tls {option} takes one or more values")));
                }
                lines.insert(format!("{key}.tls_{option}"), n.line);
                let values: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
                match *option {
                    "protocols" => site.tls_protocols = values,
                    "ciphers" => site.tls_ciphers.extend(values),
                    "curves" => site.tls_curves.extend(values),
                    _ => site.tls_alpn = values,
                }
            }
            (["issuer", "acme"], options) => {
                lines.insert(format!("{key}.tls_challenges"), n.line);
                let mut challenges = vec!["http-01", "tls-alpn-01"];
                for o in options.iter().flatten() {
                    if tls_dns_option(p, key, o, site, lines)? {
                        continue;
                    }
                    let words: Vec<&str> = o.tokens.iter().map(|t| t.text.as_str()).collect();
                    match words.as_slice() {
                        ["disable_http_challenge"] => challenges.retain(|c| *c != "http-01"),
                        ["disable_tlsalpn_challenge"] => challenges.retain(|c| *c != "tls-alpn-01"),
                        _ => {
                            return Err(p.err(
                                        o.line,
                                        format!("issuer acme option {:?} is not supported (disable_http_challenge, disable_tlsalpn_challenge, dns, propagation_delay, propagation_timeout and resolvers are)", words.join(" ")),
                                    ));
                        }
                    }
                }
                site.tls_challenges = challenges.into_iter().map(str::to_owned).collect();
            }
            (["client_auth"], Some(options)) => {
                lines.insert(format!("{key}.client_auth"), n.line);
                let mut auth = config::ClientAuthToml::default();
                for o in options {
                    let words: Vec<&str> = o.tokens.iter().map(|t| t.text.as_str()).collect();
                    match words.as_slice() {
                        ["mode", mode] => auth.mode = Some((*mode).to_owned()),
                        ["trusted_ca_cert_file", file] => {
                            auth.trusted_ca_cert_files.push(PathBuf::from(file))
                        }
                        _ => {
                            return Err(p.err(
                                        o.line,
                                        format!("client_auth option {:?} is not supported (mode and trusted_ca_cert_file are)", words.join(" ")),
                                    ));
                        }
                    }
                }
                site.client_auth = Some(auth);
            }
            _ => {
                return Err(p.err(
                            n.line,
                            format!("tls option {:?} is not supported (protocols, ciphers, curves, alpn, on_demand, ca, ca_root, eab, key_type, issuer internal, issuer acme, dns, propagation_delay, propagation_timeout, resolvers and client_auth are)", words.join(" ")),
                        ));
            }
        }
    }
    Ok(())
}

fn lines_of(nodes: Vec<Node>) -> Vec<Line> {
    nodes
        .into_iter()
        .map(|n| Line {
            words: words_of(n.tokens),
            line: n.line,
            block: n.block.map(lines_of),
        })
        .collect()
}

fn site(
    p: &Parser<'_>,
    address_tokens: Vec<Token>,
    line: usize,
    body: Vec<Node>,
    index: usize,
    lines: &mut BTreeMap<String, usize>,
) -> Result<SiteToml, CaddyfileError> {
    let key = format!("site[{index}]");
    lines.insert(key.clone(), line);
    let mut site = SiteToml::default();
    for token in &address_tokens {
        for address in token.text.split(',').filter(|a| !a.is_empty()) {
            site.addresses.push(address.to_owned());
        }
    }
    let mut seen_tls = false;
    let mut rest = Vec::new();
    let mut errors = None;
    for node in body {
        let name = node.tokens[0].text.as_str();
        let args = &node.tokens[1..];
        let line = node.line;
        match name {
            "tls" => {
                if seen_tls {
                    return Err(p.err(line, "tls given twice in one site"));
                }
                seen_tls = true;
                lines.insert(format!("{key}.tls"), line);
                match (args, &node.block) {
                    ([v], block) if v.text == "internal" => {
                        site.tls = Some("internal".into());
                        if let Some(block) = block {
                            tls_block(p, &key, block, &mut site, lines)?;
                        }
                    }
                    ([v], block) if v.text.contains('@') => {
                        lines.insert(format!("{key}.tls_email"), line);
                        site.tls_email = Some(v.text.clone());
                        if let Some(block) = block {
                            tls_block(p, &key, block, &mut site, lines)?;
                        }
                    }
                    ([], Some(block)) => tls_block(p, &key, block, &mut site, lines)?,
                    ([cert, key_file], block) => {
                        lines.insert(format!("{key}.tls_certificate"), line);
                        lines.insert(format!("{key}.tls_key"), line);
                        site.tls_certificate = Some(PathBuf::from(&cert.text));
                        site.tls_key = Some(PathBuf::from(&key_file.text));
                        if let Some(block) = block {
                            tls_block(p, &key, block, &mut site, lines)?;
                        }
                    }
                    _ => {
                        return Err(p.err(
                            line,
                            "only `tls internal`, `tls EMAIL` and `tls { issuer internal }` are supported",
                        ));
                    }
                }
            }
            "log" => {
                if site.log.is_some() {
                    return Err(p.err(line, "log given twice in one site"));
                }
                lines.insert(format!("{key}.log"), line);
                site.log = Some(log_block(p, line, args, node.block)?);
            }
            "handle_errors" => {
                if errors.is_some() {
                    return Err(p.err(line, "handle_errors given twice in one site"));
                }
                if !args.is_empty() {
                    return Err(p.err(line, "handle_errors takes a block only"));
                }
                errors = Some((line, node.block.unwrap_or_default()));
            }
            _ => rest.push(node),
        }
    }
    let mut scope = Scope::default();
    let at = |e: directives::At| p.err(e.line, e.message);
    site.route = directives::parse_routes(&lines_of(rest), &mut scope, &format!("{key}.route"))
        .map_err(at)?;
    if let Some((line, block)) = errors {
        lines.insert(format!("{key}.handle_errors"), line);
        site.handle_errors = directives::parse_routes(
            &lines_of(block),
            &mut scope,
            &format!("{key}.handle_errors"),
        )
        .map_err(at)?;
    }
    site.matchers = scope.matchers;
    lines.extend(scope.lines);
    Ok(site)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::directives::DirectiveToml;

    /// The upstreams of the site's `n`th reverse_proxy.
    fn proxy_to(site: &SiteToml, n: usize) -> Vec<String> {
        site.route
            .iter()
            .filter_map(|r| match &r.directive {
                DirectiveToml::ReverseProxy(p) => Some(p.to.clone()),
                _ => None,
            })
            .nth(n)
            .unwrap_or_default()
    }

    fn parse_text(text: &str) -> Result<EdgeToml, CaddyfileError> {
        parse(Path::new("/etc/Caddyfile"), text, &Env::default()).map(|p| p.toml)
    }

    fn err_text(text: &str) -> String {
        parse_text(text).unwrap_err().to_string()
    }

    #[test]
    fn a_block_without_a_directive_is_an_error_not_a_panic() {
        // Found by fuzzing (the caddyfile target): each panicked indexing the empty line.
        for text in [
            "example.org\n{\n}\n",
            "example.org {\n\t{\n\t}\n}\n",
            "{\n\t{\n\t}\n}\nexample.org {\n}\n",
            "example.org {\n\theader {\n\t\t{\n\t\t}\n\t}\n}\n",
        ] {
            let err = err_text(text);
            assert!(
                err.contains("global options block") || err.contains("block must open"),
                "{text:?}: {err}"
            );
        }
    }

    #[test]
    fn the_reference_lab_caddyfile_parses() {
        let toml = parse_text(
            "lab.example.org {\n\treverse_proxy localhost:7001\n}\n\ngit.example.org {\n\treverse_proxy localhost:3000\n}\n",
        )
        .unwrap();
        assert_eq!(toml.sites.len(), 2);
        assert_eq!(toml.sites[0].addresses, ["lab.example.org"]);
        assert_eq!(proxy_to(&toml.sites[1], 0), ["localhost:3000"]);
    }

    #[test]
    fn global_options_use_caddys_spellings() {
        let toml = parse_text(
            "{\n email ops@example.org\n http_port 8080\n https_port 8443\n storage file_system /srv/edge\n admin off\n}\nlocalhost {\n reverse_proxy :9000\n}\n",
        )
        .unwrap();
        assert_eq!(toml.email.as_deref(), Some("ops@example.org"));
        assert_eq!((toml.http_port, toml.https_port), (Some(8080), Some(8443)));
        assert_eq!(toml.storage, Some(PathBuf::from("/srv/edge")));
    }

    #[test]
    fn directives_with_matchers_and_blocks_parse() {
        let toml = parse_text(
            r#"a.local, b.local {
	tls internal
	encode gzip zstd
	header /static/* Cache-Control "max-age=3600"
	header {
		-Server
		+X-Extra one
		?X-Frame-Options DENY
	}
	redir /old /new permanent
	redir https://elsewhere.local{uri}
	basic_auth /admin/* bcrypt Admin {
		alice $2a$04$abcdefghijklmnopqrstuuJ2/h8VXFHbGvd1mXvkykXq5WcWxm3ky
	}
	reverse_proxy /api/* 127.0.0.1:1 127.0.0.1:2 {
		lb_policy first
		fail_duration 5s
		header_up X-Real-IP {remote_host}
		header_down -X-Powered-By
	}
	reverse_proxy 127.0.0.1:3
	log
}
"#,
        )
        .unwrap();
        let s = &toml.sites[0];
        assert_eq!(s.addresses, ["a.local", "b.local"]);
        assert_eq!(s.tls.as_deref(), Some("internal"));
        let names: Vec<(&str, Option<&str>)> = s
            .route
            .iter()
            .map(|r| (r.directive.name(), r.matcher.as_deref()))
            .collect();
        assert_eq!(
            names,
            [
                ("encode", None),
                ("header", Some("/static/*")),
                ("header", None),
                ("redir", Some("/old")),
                ("redir", None),
                ("basic_auth", Some("/admin/*")),
                ("reverse_proxy", Some("/api/*")),
                ("reverse_proxy", None),
            ]
        );
        let DirectiveToml::Header(h) = &s.route[2].directive else {
            panic!("{:?}", s.route[2]);
        };
        assert_eq!(h.ops.delete, ["Server"]);
        assert_eq!(h.ops.add["X-Extra"], "one");
        assert_eq!(h.ops.default["X-Frame-Options"], "DENY");
        let DirectiveToml::Redir(r) = &s.route[3].directive else {
            panic!("{:?}", s.route[3]);
        };
        assert_eq!((r.to.as_str(), r.code), ("/new", Some(301)));
        let DirectiveToml::BasicAuth(a) = &s.route[5].directive else {
            panic!("{:?}", s.route[5]);
        };
        assert_eq!(a.realm.as_deref(), Some("Admin"));
        assert_eq!(proxy_to(s, 0), ["127.0.0.1:1", "127.0.0.1:2"]);
        let DirectiveToml::ReverseProxy(p) = &s.route[6].directive else {
            panic!("{:?}", s.route[6]);
        };
        assert_eq!(p.lb_policy.as_deref(), Some("first"));
        assert_eq!(p.header_down.delete, ["X-Powered-By"]);
    }

    #[test]
    fn unsupported_directives_name_file_line_and_directive() {
        let text = err_text("lab.example.org {\n\treverse_proxy :1\n\tacme_server\n}\n");
        assert_eq!(
            text,
            "/etc/Caddyfile:3: unsupported directive \"acme_server\" (see man edge-caddyfile)"
        );
        let text = err_text("{\n\trenew_interval 10m\n}\n");
        assert!(
            text.starts_with("/etc/Caddyfile:2: global option \"renew_interval\""),
            "{text}"
        );
        let text = err_text("x.local {\n\t@api tls_version 1.3\n}\n");
        assert!(text.contains(":2: matcher @api: "), "{text}");
        assert!(text.contains("tls_version"), "{text}");
        let text = err_text("x.local {\n\treverse_proxy :1 {\n\t\tbuffer_requests\n\t}\n}\n");
        assert!(
            text.contains(":3: reverse_proxy buffer_requests is not supported"),
            "{text}"
        );
    }

    #[test]
    fn snippets_and_imported_files_expand_with_their_arguments_and_lines() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(
            dir.path().join("conf.d/a.caddy"),
            "a.local {\n\treverse_proxy {args[0]}\n}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("conf.d/b.caddy"),
            "b.local {\n\timport headers\n\tbogus_directive\n}\n",
        )
        .unwrap();
        let main = dir.path().join("Caddyfile");
        let text = "(headers) {\n\theader X-Site {args.0}\n}\n(proxy) {\n\treverse_proxy {args[0]} {\n\t\theader_up X-Who {args[1]}\n\t}\n}\nc.local {\n\timport headers one\n\timport headers two\n\timport proxy 127.0.0.1:9 me\n}\n";
        let parsed = parse(&main, text, &Env::default()).unwrap();
        let c = &parsed.toml.sites[0];
        let names: Vec<&str> = c.route.iter().map(|r| r.directive.name()).collect();
        assert_eq!(names, ["header", "header", "reverse_proxy"]);
        let DirectiveToml::Header(h) = &c.route[1].directive else {
            panic!("{:?}", c.route[1]);
        };
        assert_eq!(h.ops.set["X-Site"], "two");
        assert_eq!(proxy_to(c, 0), ["127.0.0.1:9"]);
        // A file import with a glob, where a refusal names the imported file and its line.
        let text = "(headers) {\n\theader X 1\n}\nimport conf.d/*.caddy 127.0.0.1:7\n";
        let err = parse(&main, text, &Env::default()).unwrap_err().to_string();
        let b = dir.path().join("conf.d/b.caddy");
        assert!(err.starts_with(&format!("{}:3: ", b.display())), "{err}");
        assert!(err.contains("bogus_directive"), "{err}");
        let text = "import conf.d/a.caddy 127.0.0.1:7\n";
        let parsed = parse(&main, text, &Env::default()).unwrap();
        assert_eq!(proxy_to(&parsed.toml.sites[0], 0), ["127.0.0.1:7"]);
    }

    #[test]
    fn braces_must_balance() {
        assert!(err_text("x.local {\n reverse_proxy :1\n").contains(":1: this { is never closed"));
        assert!(err_text("}\n").contains(":1: unexpected }"));
    }

    #[test]
    fn a_single_site_may_omit_its_braces() {
        let toml = parse_text("localhost\nreverse_proxy :8000\n").unwrap();
        assert_eq!(toml.sites[0].addresses, ["localhost"]);
        assert_eq!(proxy_to(&toml.sites[0], 0), [":8000"]);
    }

    #[test]
    fn environment_placeholders_are_substituted() {
        let env = Env::from_pairs([("UPSTREAM", "127.0.0.1:9")]);
        let parsed = parse(
            Path::new("C"),
            "localhost {\n reverse_proxy {$UPSTREAM} {$OTHER:127.0.0.1:10}\n}\n",
            &env,
        )
        .unwrap();
        assert_eq!(
            proxy_to(&parsed.toml.sites[0], 0),
            ["127.0.0.1:9", "127.0.0.1:10"]
        );
        let err = parse(
            Path::new("C"),
            "localhost {\n reverse_proxy {$NOPE}\n}\n",
            &env,
        )
        .unwrap_err();
        assert!(err.to_string().contains("NOPE is not set"), "{err}");
    }

    #[test]
    fn tls_dns_and_acme_dns_map_to_dns_tables_and_bad_options_are_refused_by_line() {
        let toml = parse_text(
            "{\n acme_dns cloudflare {env.CF_API_TOKEN}\n}\n*.example.org {\n tls {\n  dns rfc2136 {\n   key_name edge-key\n   key_alg hmac-sha512\n   key c2VjcmV0\n   server 10.0.0.53:5353\n  }\n  propagation_delay 5s\n  propagation_timeout -1\n  resolvers 1.1.1.1 9.9.9.9:53\n }\n}\nlab.example.org {\n tls {\n  propagation_timeout 1m\n }\n}\n",
        )
        .unwrap();
        let global = toml.acme.dns.as_ref().unwrap();
        assert_eq!(global.provider.as_deref(), Some("cloudflare"));
        assert_eq!(format!("{:?}", global.token), "Some({env.CF_API_TOKEN})");
        let site = toml.sites[0].tls_dns.as_ref().unwrap();
        assert_eq!(site.provider.as_deref(), Some("rfc2136"));
        assert_eq!(site.key_name.as_deref(), Some("edge-key"));
        assert_eq!(site.key_alg.as_deref(), Some("hmac-sha512"));
        assert_eq!(site.server.as_deref(), Some("10.0.0.53:5353"));
        assert_eq!(site.propagation_delay.as_deref(), Some("5s"));
        assert_eq!(site.propagation_timeout.as_deref(), Some("-1"));
        assert_eq!(site.resolvers, ["1.1.1.1", "9.9.9.9:53"]);
        // The secret is not printed back by `edge adapt`.
        let adapted = toml::to_string(&toml).unwrap();
        assert!(!adapted.contains("c2VjcmV0"), "{adapted}");
        assert!(adapted.contains("{env.CF_API_TOKEN}"), "{adapted}");
        // A site with only propagation options takes the global provider.
        let lab = toml.sites[1].tls_dns.as_ref().unwrap();
        assert_eq!(lab.provider, None);
        let config = config::resolve(
            toml,
            &ConfigFile::new(Path::new("/etc/Caddyfile")),
            &Env::from_pairs([("CF_API_TOKEN", "t")]),
        )
        .unwrap();
        assert!(config.site_dns.iter().all(Option::is_some));
        for (text, want) in [
            (
                "a.org {\n tls {\n  dns route53\n }\n}\n",
                "/etc/Caddyfile:3: DNS provider \"route53\"",
            ),
            (
                "a.org {\n tls {\n  dns rfc2136 {\n   secret x\n  }\n }\n}\n",
                "/etc/Caddyfile:4: dns rfc2136 option \"secret\"",
            ),
            (
                "a.org {\n tls {\n  dns desec a b\n }\n}\n",
                "/etc/Caddyfile:3: dns desec takes one token",
            ),
            (
                "{\n acme_dns\n}\n",
                "/etc/Caddyfile:2: dns takes a provider",
            ),
        ] {
            let err = err_text(text);
            assert!(err.starts_with(want), "{err}");
        }
    }

    #[test]
    fn resolve_errors_point_at_the_caddyfile_line() {
        let path = Path::new("/etc/Caddyfile");
        let parsed = parse(
            path,
            "a.local {\n\treverse_proxy :1\n}\n*.example.org {\n\treverse_proxy :2\n}\n",
            &Env::default(),
        )
        .unwrap();
        let err = config::resolve(parsed.toml.clone(), &ConfigFile::new(path), &Env::default())
            .unwrap_err();
        let located = parsed.locate(path, err).to_string();
        assert!(located.starts_with("/etc/Caddyfile:4: "), "{located}");
        assert!(located.contains("DNS-01"), "{located}");
    }

    #[test]
    fn tls_ca_eab_and_key_type_make_a_site_issuer_over_the_global_one_and_bad_ones_name_their_line()
    {
        let path = Path::new("/etc/Caddyfile");
        let config = load_text(
            path,
            "{\n acme_ca https://global.test/dir\n key_type p384\n acme_eab {\n  key_id g1\n  mac_key c2VjcmV0\n }\n}\n\
             zero.example.org {\n tls {\n  ca https://acme.zerossl.test/v2/DV90\n  ca_root /etc/zero.pem\n  eab kid-1 bWFjLWtleQ\n  key_type rsa2048\n }\n respond ok\n}\n\
             plain.example.org {\n respond ok\n}\n",
            &Env::default(),
        )
        .unwrap();
        assert_eq!(config.acme.directory, "https://global.test/dir");
        assert_eq!(config.acme.key_type, config::KeyType::P384);
        assert_eq!(config.acme.eab.as_ref().unwrap().key_id, "g1");
        let own = config.site_issuers[0].as_ref().unwrap();
        assert_eq!(own.directory, "https://acme.zerossl.test/v2/DV90");
        assert_eq!(own.root, Some(PathBuf::from("/etc/zero.pem")));
        assert_eq!(own.key_type, config::KeyType::Rsa2048);
        assert_eq!(own.eab.as_ref().unwrap().key_id, "kid-1");
        assert!(!format!("{own:?}").contains("bWFjLWtleQ"));
        assert!(config.site_issuers[1].is_none());

        for (text, wanted) in [
            (
                "x.example.org {\n tls {\n  key_type rsa8192\n }\n}\n",
                "/etc/Caddyfile:3: ",
            ),
            (
                "x.example.org {\n tls {\n  ca http://plain.test/dir\n }\n}\n",
                "/etc/Caddyfile:3: ",
            ),
            (
                "x.example.org {\n tls {\n  eab kid-1 %%%\n }\n}\n",
                "/etc/Caddyfile:3: ",
            ),
            (
                "x.example.org {\n tls internal {\n  ca https://ca.test/dir\n }\n}\n",
                "not with tls internal",
            ),
        ] {
            let parsed = parse(path, text, &Env::default()).unwrap();
            let err = config::resolve(parsed.toml.clone(), &ConfigFile::new(path), &Env::default())
                .unwrap_err();
            let located = parsed.locate(path, err).to_string();
            assert!(located.contains(wanted), "{text:?}: {located}");
            assert!(!located.contains("%%%"), "{located}");
        }
        let err = err_text("x.example.org {\n tls {\n  eab kid-1 %%% extra\n }\n}\n");
        assert!(err.contains(":3: tls eab takes"), "{err}");
        assert!(!err.contains("%%%"), "{err}");
    }

    #[test]
    fn servers_auto_https_and_log_options_map_to_toml_keys_and_the_rest_is_refused_by_line() {
        let toml = parse_text(
            "{\n auto_https disable_redirects\n servers {\n  protocols h1 h2\n  timeouts {\n   read_header 5s\n   read_body 30s\n   write 1m\n   idle 1m\n  }\n  max_header_size 16KB\n }\n log {\n  format console\n }\n}\nx.local {\n log access {\n  output file /var/log/x.log {\n   roll_size 10MB\n   roll_keep 3\n  }\n  level ERROR\n }\n tls /etc/x.crt /etc/x.key\n}\n",
        )
        .unwrap();
        assert_eq!(toml.auto_https.as_deref(), Some("disable_redirects"));
        assert_eq!(toml.limits.header_read_timeout.as_deref(), Some("5s"));
        assert_eq!(toml.limits.idle_timeout.as_deref(), Some("1m"));
        assert_eq!(toml.limits.read_body_timeout.as_deref(), Some("30s"));
        assert_eq!(toml.limits.write_timeout.as_deref(), Some("1m"));
        assert_eq!(toml.limits.max_header_bytes, Some(16_000));
        assert_eq!(
            toml.limits.http3,
            Some(false),
            "protocols h1 h2 turns HTTP/3 off"
        );
        assert_eq!(
            toml.log.as_ref().unwrap().format.as_deref(),
            Some("console")
        );
        let log = toml.sites[0].log.as_ref().unwrap();
        assert_eq!(log.name.as_deref(), Some("access"));
        assert_eq!(log.output.as_deref(), Some("/var/log/x.log"));
        assert_eq!(log.roll_size.as_deref(), Some("10MB"));
        assert_eq!(log.roll_keep, Some(3));
        assert_eq!(
            toml.sites[0].tls_certificate,
            Some(PathBuf::from("/etc/x.crt"))
        );
        let debug = parse_text(
            "{\n debug\n}\na.example.org {\n tls {\n  issuer acme {\n   disable_http_challenge\n  }\n }\n}\n",
        )
        .unwrap();
        assert_eq!(debug.debug, Some(true));
        assert_eq!(debug.sites[0].tls_challenges, ["tls-alpn-01"]);
        for (text, wanted) in [
            (
                "{\n servers {\n  protocols h2 h3\n }\n}\n",
                ":3: servers protocols: only `h1 h2 h3`",
            ),
            (
                "{\n servers :443 {\n  protocols h1 h2\n }\n}\n",
                ":2: servers with a listener",
            ),
            (
                "{\n servers {\n  client_ip_headers X-Real-IP\n }\n}\n",
                ":3: servers client_ip_headers needs trusted_proxies",
            ),
            (
                "{\n servers {\n  trusted_proxies cloudflare\n }\n}\n",
                ":3: trusted_proxies source \"cloudflare\"",
            ),
            (
                "{\n servers {\n  listener_wrappers {\n   tls\n   proxy_protocol\n  }\n }\n}\n",
                ":4: listener_wrappers: tls goes once, after proxy_protocol",
            ),
            (
                "{\n servers {\n  listener_wrappers {\n   proxy_protocol {\n    timeout 0s\n   }\n  }\n }\n}\n",
                ":4: proxy_protocol timeout",
            ),
            (
                "{\n servers {\n  listener_wrappers {\n   proxy_protocol\n  }\n }\n}\n",
                ":4: listener_wrappers: write tls after proxy_protocol",
            ),
            (
                "{\n servers {\n  listener_wrappers {\n   http_redirect\n  }\n }\n}\n",
                ":4: listener wrapper \"http_redirect\"",
            ),
            (
                "{\n auto_https sometimes\n}\n",
                ":2: auto_https \"sometimes\"",
            ),
            (
                "x.local {\n log {\n  output net localhost:9\n }\n}\n",
                ":3: log output",
            ),
            (
                "x.local {\n log {\n  include http.log.access\n }\n}\n",
                ":3: log option \"include\"",
            ),
        ] {
            let err = err_text(text);
            assert!(err.contains(wanted), "{text:?}: {err}");
        }
    }

    #[test]
    fn acme_global_options_map_to_toml_keys() {
        let toml = parse(
            Path::new("/etc/Caddyfile"),
            "{\n acme_ca https://ca.test/dir\n acme_ca_root /etc/ca.pem\n key_type rsa2048\n renewal_window_ratio 0.5\n acme_challenges tls-alpn-01\n acme_retry_base 2s\n}\nlab.example.org {\n reverse_proxy :9000\n}\n",
            &Env::default(),
        )
        .unwrap()
        .toml;
        assert_eq!(toml.acme_ca.as_deref(), Some("https://ca.test/dir"));
        assert_eq!(toml.acme_ca_root, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(toml.key_type.as_deref(), Some("rsa2048"));
        assert_eq!(toml.acme.renewal_window_ratio, Some(0.5));
        assert_eq!(toml.acme.challenges, vec!["tls-alpn-01".to_owned()]);
        assert_eq!(toml.acme.retry_base.as_deref(), Some("2s"));
    }

    #[test]
    fn servers_trusted_proxies_client_ip_headers_and_proxy_protocol_are_read() {
        let toml = parse_text(
            "{\n servers {\n  trusted_proxies static 10.0.0.0/8 private_ranges\n  trusted_proxies_strict\n  client_ip_headers X-Real-IP X-Forwarded-For x-real-ip\n  listener_wrappers {\n   proxy_protocol {\n    timeout 2s\n    allow 192.0.2.0/24 10.0.0.1\n   }\n   tls\n  }\n }\n}\n:8080 {\n respond ok\n}\n",
        )
        .unwrap();
        assert_eq!(
            toml.client_ip.trusted_proxies,
            ["10.0.0.0/8", "private_ranges"]
        );
        assert_eq!(toml.client_ip.headers, ["X-Real-IP", "X-Forwarded-For"]);
        assert!(toml.client_ip.strict);
        let pp = toml.proxy_protocol.unwrap();
        assert_eq!(pp.timeout.as_deref(), Some("2s"));
        assert_eq!(pp.allow, ["192.0.2.0/24", "10.0.0.1"]);
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;

    fn load(text: &str) -> Result<Config, CaddyfileError> {
        load_text(Path::new("/etc/Caddyfile"), text, &Env::default())
    }

    #[test]
    fn on_demand_tls_and_handshake_options_are_read() {
        let config = load(
            "{\n\ton_demand_tls {\n\t\task http://127.0.0.1:5555/check\n\t\tinterval 2m\n\t\tburst 5\n\t}\n\tskip_install_trust\n}\nhttps:// {\n\ttls {\n\t\ton_demand\n\t\tprotocols tls1.2 tls1.3\n\t\tciphers TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256\n\t\tcurves x25519\n\t\talpn http/1.1\n\t}\n\trespond ok\n}\n",
        )
        .unwrap();
        let od = config.on_demand.as_ref().unwrap();
        assert_eq!(od.ask.as_ref().unwrap().path_and_query, "/check?");
        assert_eq!(od.rate, Some((std::time::Duration::from_secs(120), 5)));
        let site = &config.sites[0];
        assert!(site.on_demand);
        let options = site.tls_options.as_ref().unwrap();
        assert_eq!(options.tls12_suites.len(), 1);
        assert_eq!(options.alpn(), vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn local_certs_serves_every_site_from_the_internal_ca() {
        let config = load("{\n\tlocal_certs\n}\nexample.org {\n\trespond ok\n}\n").unwrap();
        let site = &config.sites[0];
        assert_eq!(
            site.tls_policy(&site.addresses[0].host),
            crate::site::TlsPolicy::Internal
        );
        let config =
            load("example.org {\n\ttls internal {\n\t\tprotocols tls1.3\n\t}\n}\n").unwrap();
        let site = &config.sites[0];
        assert!(site.tls_internal && site.tls_options.is_some());
    }

    #[test]
    fn tls_names_rustls_cannot_do_are_refused_with_file_and_line() {
        for (text, line, word) in [
            (
                "example.org {\n\ttls {\n\t\tciphers TLS_RSA_WITH_AES_128_CBC_SHA\n\t}\n}\n",
                3,
                "TLS_RSA_WITH_AES_128_CBC_SHA",
            ),
            (
                "example.org {\n\ttls {\n\t\tprotocols tls1.1\n\t}\n}\n",
                3,
                "tls1.1",
            ),
            (
                "example.org {\n\ttls {\n\t\tcurves secp521r1\n\t}\n}\n",
                3,
                "secp521r1",
            ),
            (
                "{\n\ton_demand_tls {\n\t\task ftp://x\n\t}\n}\nexample.org {\n}\n",
                3,
                "ftp://x",
            ),
            (
                "{\n\ton_demand_tls {\n\t\tburst 3\n\t}\n}\nexample.org {\n}\n",
                3,
                "interval",
            ),
            (
                "{\n\tlocal_certs\n}\nexample.org {\n\ttls {\n\t\ton_demand\n\t}\n}\n",
                6,
                "on-demand",
            ),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("/etc/Caddyfile:{line}:")) && err.contains(word),
                "{text:?}: {err}"
            );
        }
    }
}
