//! A FastCGI client for `php_fastcgi`: one request per connection to php-fpm (TCP or a unix
//! socket), CGI parameters built as Caddy 2.6 builds them, the request body streamed as STDIN
//! records and the STDOUT stream parsed into a streamed HTTP response.
//!
//! Invariants:
//! - The upstream is not trusted to be well-behaved (a broken or hostile PHP app): its CGI
//!   header block is bounded ([`MAX_HEADER_BYTES`]) and must parse, its status must be a real
//!   one, hop-by-hop headers it sends are dropped, and STDERR is logged in bounded pieces.
//!   Anything else is a 502; no byte of a bad header block reaches the client.
//! - The body is never held whole: STDOUT records are passed on as they arrive, and the request
//!   body goes upstream as it comes in. The one exception is a request body of unknown length
//!   (chunked, or HTTP/2 without Content-Length): FastCGI needs CONTENT_LENGTH first, so it is
//!   collected up to [`MAX_UNSIZED_BODY`] (413 beyond).
//! - Every network wait has a deadline: dialing (`dial_timeout`), writing the request
//!   (`write_timeout`), reading (`read_timeout`, or [`IDLE_READ`] between reads). Upstream down
//!   is a 502, a deadline passed before the response began is a 504.
//! - A connection carries one request and is closed after it, as Caddy does by default (php-fpm
//!   closes it anyway unless asked to keep it).
//!
//! Why not a crate: `fastcgi-client` (the maintained one, 0.12) writes the whole STDIN before
//! reading, returns STDOUT unparsed and unbounded, and needs a futures-io bridge; the record
//! framing it would save is the smallest part of this module.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Body as HttpBody, Frame};
use hyper::http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::time::Instant;

use crate::body::{Body, BoxError, ReqBody};
use crate::files::{OriginalUri, TryFiles, join, try_files};

/// The most a CGI header block from the upstream may take (nginx's default is 4 or 8 KiB).
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The most of a request body of unknown length collected to learn its length.
const MAX_UNSIZED_BODY: usize = 16 * 1024 * 1024;
/// With no `read_timeout`, the longest wait for the next record from the upstream.
const IDLE_READ: Duration = Duration::from_secs(300);
/// With no `write_timeout`, the longest wait for the upstream to take request bytes.
const IDLE_WRITE: Duration = Duration::from_secs(300);
/// STDERR logged per request, at most (the rest is counted).
const MAX_STDERR_LOGGED: usize = 8 * 1024;
/// The largest record content.
const MAX_RECORD: usize = 65_535;

const VERSION: u8 = 1;
const BEGIN_REQUEST: u8 = 1;
const END_REQUEST: u8 = 3;
const PARAMS: u8 = 4;
const STDIN: u8 = 5;
const STDOUT: u8 = 6;
const STDERR: u8 = 7;
const RESPONDER: u16 = 1;
const REQUEST_ID: u16 = 1;

/// Where php-fpm listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FastCgiAddress {
    /// `host:port`.
    Tcp(String),
    /// A unix socket.
    Unix(PathBuf),
}

impl FastCgiAddress {
    /// An upstream as a Caddyfile writes it: `host:port`, `tcp/host:port`, `unix//path`.
    pub(crate) fn parse(text: &str) -> Result<FastCgiAddress, String> {
        if let Some(path) = text.strip_prefix("unix/") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{text}: a unix socket needs an absolute path (unix//run/php/php-fpm.sock)"
                ));
            }
            return Ok(FastCgiAddress::Unix(PathBuf::from(path)));
        }
        let hostport = text
            .strip_prefix("tcp/")
            .or_else(|| text.strip_prefix("fastcgi://"))
            .unwrap_or(text);
        match crate::site::split_host_port(hostport) {
            Some((host, Some(_))) if !host.is_empty() => {
                Ok(FastCgiAddress::Tcp(hostport.to_owned()))
            }
            _ => Err(format!(
                "{text}: a FastCGI upstream is host:port or unix//path"
            )),
        }
    }
}

impl std::fmt::Display for FastCgiAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FastCgiAddress::Tcp(addr) => f.write_str(addr),
            FastCgiAddress::Unix(path) => write!(f, "unix/{}", path.display()),
        }
    }
}

/// A `php_fastcgi`'s settings.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FastCgiConfig {
    /// php-fpm's address.
    pub(crate) address: FastCgiAddress,
    /// The site root (`root`), as the upstream sees files.
    pub(crate) root: PathBuf,
    /// Where a path splits into script and PATH_INFO (`split`, default `.php`).
    pub(crate) split_path: Vec<String>,
    /// The index script tried for directories and as the fallback (`index`, default
    /// `index.php`); `None` is `index off`: no redirect, no rewrite.
    pub(crate) index: Option<String>,
    /// `try_files` replacing the default `{path} {path}/index.php index.php`.
    pub(crate) try_files: Option<Vec<String>>,
    /// Extra parameters (`env KEY VALUE`), placeholders already expanded.
    pub(crate) env: Vec<(String, String)>,
    /// DOCUMENT_ROOT with symlinks resolved (`resolve_root_symlink`).
    pub(crate) resolve_root_symlink: bool,
    /// How long to wait for a connection (Caddy's default: 3 s).
    pub(crate) dial_timeout: Duration,
    /// A deadline for all reads of one request, from the start (Caddy's `read_timeout`).
    pub(crate) read_timeout: Option<Duration>,
    /// A deadline for sending the request (Caddy's `write_timeout`).
    pub(crate) write_timeout: Option<Duration>,
}

impl FastCgiConfig {
    /// Caddy's defaults for `php_fastcgi ADDRESS` under `root`.
    pub(crate) fn new(address: FastCgiAddress, root: impl Into<PathBuf>) -> FastCgiConfig {
        FastCgiConfig {
            address,
            root: root.into(),
            split_path: vec![".php".to_owned()],
            index: Some("index.php".to_owned()),
            try_files: None,
            env: Vec::new(),
            resolve_root_symlink: false,
            dial_timeout: Duration::from_secs(3),
            read_timeout: None,
            write_timeout: None,
        }
    }
}

/// What the connection and the handler chain know about a request.
#[derive(Clone, Debug)]
pub(crate) struct FastCgiContext {
    /// The client's address (REMOTE_ADDR, REMOTE_PORT).
    pub(crate) remote_addr: SocketAddr,
    /// Whether the request came over TLS (HTTPS=on, REQUEST_SCHEME).
    pub(crate) https: bool,
    /// mod_ssl's SSL_PROTOCOL (`TLSv1.3`), over TLS.
    pub(crate) ssl_protocol: Option<String>,
    /// The cipher suite's IANA name (SSL_CIPHER), over TLS.
    pub(crate) ssl_cipher: Option<String>,
    /// The user basic_auth let in (REMOTE_USER).
    pub(crate) remote_user: Option<String>,
    /// What followed the split extension when `try_files` matched (Caddy's
    /// `{http.matchers.file.remainder}`): PATH_INFO when the path itself does not split.
    pub(crate) file_remainder: Option<String>,
    /// The root for this request when the config names none of its own (the site's `root`,
    /// Caddy's `{http.vars.root}`): made absolute, and resolved with `resolve_root_symlink`.
    pub(crate) root: Option<PathBuf>,
}

/// What `php_fastcgi`'s own routes do with a request before it reaches [`FastCgi::serve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PhpRoute {
    /// A directory with an index script, asked without its slash: 308 to this path.
    Redirect(String),
    /// Serve with the path rewritten to this script (the query kept) and this file remainder.
    Rewrite {
        /// The script's path under the root.
        path: String,
        /// Caddy's `{http.matchers.file.remainder}`.
        remainder: String,
    },
    /// No rewrite: serve as is if the path names a script, else pass to the next handler.
    AsIs,
}

/// A FastCGI upstream with its settings.
#[derive(Debug)]
pub(crate) struct FastCgi {
    config: FastCgiConfig,
    /// `config.root`, absolute (and resolved, with `resolve_root_symlink`).
    document_root: String,
    /// SERVER_SOFTWARE.
    software: String,
}

/// Why a request failed, and the status the client gets.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("connecting to FastCGI upstream {address}")]
    Dial {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("FastCGI upstream {0} took too long")]
    Timeout(String),
    #[error("FastCGI upstream {address}")]
    Io {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("FastCGI upstream {address} sent a bad response: {what}")]
    Protocol { address: String, what: String },
    #[error("reading the request body")]
    Client(#[source] BoxError),
    #[error("request body of unknown length over {MAX_UNSIZED_BODY} bytes")]
    TooLarge,
}

impl Failure {
    fn status(&self) -> StatusCode {
        match self {
            Failure::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Failure::Client(_) => StatusCode::BAD_REQUEST,
            Failure::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Failure::Dial { .. } | Failure::Io { .. } | Failure::Protocol { .. } => {
                StatusCode::BAD_GATEWAY
            }
        }
    }
}

/// A connection to the upstream.
trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}

impl FastCgi {
    /// The client for `config`.
    pub(crate) fn new(config: FastCgiConfig) -> FastCgi {
        FastCgi {
            document_root: document_root(&config.root, config.resolve_root_symlink),
            software: format!("edge/{}", env!("CARGO_PKG_VERSION")),
            config,
        }
    }

    /// `php_fastcgi`'s routes for a request path (decoded and cleaned): the redirect of a
    /// directory holding the index script to its slash form, then the rewrite to the first of
    /// `{path} {path}/INDEX INDEX` that exists (split at `.php`).
    #[cfg(test)]
    pub(crate) fn route(&self, path: &str) -> PhpRoute {
        self.route_in(&self.config.root, path)
    }

    /// [`FastCgi::route`] with the files looked up under `root` (the site's root, which the
    /// `file` matchers of Caddy's expansion use whatever the transport's root is).
    pub(crate) fn route_in(&self, root: &Path, path: &str) -> PhpRoute {
        let Some(index) = &self.config.index else {
            return PhpRoute::AsIs;
        };
        if !path.ends_with('/')
            && let TryFiles::Found { .. } =
                try_files(root, &[format!("{{path}}/{index}")], path, &[])
        {
            return PhpRoute::Redirect(format!("{path}/"));
        }
        let default;
        let patterns = match &self.config.try_files {
            Some(list) => list,
            None => {
                default = vec![
                    "{path}".to_owned(),
                    format!("{{path}}/{index}"),
                    index.clone(),
                ];
                &default
            }
        };
        match try_files(root, patterns, path, &self.config.split_path) {
            TryFiles::Found {
                relative,
                remainder,
            } => PhpRoute::Rewrite {
                path: relative,
                remainder,
            },
            _ => PhpRoute::AsIs,
        }
    }

    /// Whether a (rewritten) path names a script: php_fastcgi proxies only `*.php` paths.
    pub(crate) fn is_script(&self, path: &str) -> bool {
        let lower = path.to_ascii_lowercase();
        self.config
            .split_path
            .iter()
            .any(|ext| lower.ends_with(&ext.to_ascii_lowercase()))
    }

    /// Runs `req` on the upstream and answers with what it printed.
    pub(crate) async fn serve(
        &self,
        req: Request<ReqBody>,
        ctx: &FastCgiContext,
    ) -> Response<Body> {
        match self.exchange(req, ctx).await {
            Ok(response) => response,
            Err(failure) => {
                let status = failure.status();
                tracing::warn!(error = %error_chain(&failure), %status, "php_fastcgi");
                let mut response =
                    Response::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
                *response.status_mut() = status;
                response
            }
        }
    }

    async fn exchange(
        &self,
        req: Request<ReqBody>,
        ctx: &FastCgiContext,
    ) -> Result<Response<Body>, Failure> {
        let (parts, body) = req.into_parts();
        let path = crate::site::match_path(parts.uri.path())
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .ok_or_else(|| Failure::Client("a malformed percent-escape in the path".into()))?;
        // A NUL could make php-fpm run a file that is not a script (Caddy issue 4574).
        if path.contains('\0') {
            return Err(Failure::Client("a NUL in the path".into()));
        }

        // The body's length must be known before the parameters go out.
        let sends_body = parts.method != Method::HEAD && parts.method != Method::OPTIONS;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let mut body = Some(body);
        let mut collected: Option<Bytes> = None;
        let length = match (sends_body, declared) {
            (false, _) => 0,
            (true, Some(n)) => n,
            (true, None) => {
                let incoming = body.take().expect("the body is taken once");
                if incoming.is_end_stream() {
                    0
                } else {
                    let bytes = collect_bounded(incoming).await?;
                    let n = bytes.len() as u64;
                    collected = Some(bytes);
                    n
                }
            }
        };

        let params = self.params(&parts, &path, ctx, length);
        let started = Instant::now();
        let read_deadline = self.config.read_timeout.map(|t| started + t);
        let write_deadline = self.config.write_timeout.map(|t| started + t);
        let address = self.config.address.to_string();
        let mut conn = self.dial().await?;

        let io_err = |source| Failure::Io {
            address: address.clone(),
            source,
        };
        // Begin and the parameters.
        let mut head = Vec::with_capacity(params.len() + 64);
        let mut begin = [0u8; 8];
        begin[..2].copy_from_slice(&RESPONDER.to_be_bytes());
        push_record(&mut head, BEGIN_REQUEST, &begin);
        for chunk in params.chunks(MAX_RECORD) {
            push_record(&mut head, PARAMS, chunk);
        }
        push_record(&mut head, PARAMS, &[]);
        write_all(&mut conn, &head, write_deadline, &address).await?;

        // The body, as it comes.
        if sends_body {
            if let Some(bytes) = collected {
                write_stdin(&mut conn, &bytes, write_deadline, &address).await?;
            } else if let Some(mut incoming) = body.take() {
                while let Some(frame) = incoming.frame().await {
                    let frame = frame.map_err(Failure::Client)?;
                    if let Ok(data) = frame.into_data() {
                        write_stdin(&mut conn, &data, write_deadline, &address).await?;
                    }
                }
            }
        }
        let mut end = Vec::with_capacity(8);
        push_record(&mut end, STDIN, &[]);
        write_all(&mut conn, &end, write_deadline, &address).await?;
        conn.flush().await.map_err(io_err)?;

        // The CGI header block.
        let mut reader = Records {
            conn: BufReader::with_capacity(MAX_RECORD + 8 + 255, conn),
            deadline: read_deadline,
            address: address.clone(),
            stderr_logged: 0,
            ended: false,
        };
        let mut head = Vec::new();
        let body_start = loop {
            if let Some(end) = header_end(&head) {
                break Some(end);
            }
            if head.len() > MAX_HEADER_BYTES {
                return Err(Failure::Protocol {
                    address,
                    what: format!("a header block over {MAX_HEADER_BYTES} bytes"),
                });
            }
            match reader.next_stdout().await? {
                Some(chunk) => head.extend_from_slice(&chunk),
                None => break None,
            }
        };
        let (block, rest) = match body_start {
            Some((block_end, rest_start)) => {
                let rest = Bytes::copy_from_slice(&head[rest_start..]);
                head.truncate(block_end);
                (head, rest)
            }
            // Output ended inside the header block: what came is the header, as Go reads it.
            None => (head, Bytes::new()),
        };
        if block.len() > MAX_HEADER_BYTES {
            return Err(Failure::Protocol {
                address,
                what: format!("a header block over {MAX_HEADER_BYTES} bytes"),
            });
        }
        let (status, headers) = parse_head(&block).map_err(|what| Failure::Protocol {
            address: address.clone(),
            what,
        })?;

        let stream =
            futures_util::stream::unfold((reader, Some(rest)), |(mut reader, first)| async move {
                if let Some(first) = first.filter(|b| !b.is_empty()) {
                    return Some((Ok(Frame::data(first)), (reader, None)));
                }
                match reader.next_stdout().await {
                    Ok(Some(chunk)) => Some((Ok(Frame::data(chunk)), (reader, None))),
                    Ok(None) => None,
                    Err(failure) => {
                        tracing::warn!(error = %error_chain(&failure), "php_fastcgi response body");
                        Some((Err(BoxError::from(failure)), (reader, None)))
                    }
                }
            });
        let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }

    async fn dial(&self) -> Result<Box<dyn Conn>, Failure> {
        let address = self.config.address.to_string();
        let dial = async {
            match &self.config.address {
                FastCgiAddress::Tcp(addr) => {
                    let stream = tokio::net::TcpStream::connect(addr.as_str()).await?;
                    stream.set_nodelay(true)?;
                    Ok::<Box<dyn Conn>, std::io::Error>(Box::new(stream))
                }
                FastCgiAddress::Unix(path) => {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<Box<dyn Conn>, std::io::Error>(Box::new(stream))
                }
            }
        };
        match tokio::time::timeout(self.config.dial_timeout, dial).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(source)) => Err(Failure::Dial { address, source }),
            // Caddy answers a dial timeout with 502 too: the upstream is not there.
            Err(_) => Err(Failure::Dial {
                address,
                source: std::io::ErrorKind::TimedOut.into(),
            }),
        }
    }

    /// The CGI parameters as FastCGI name-value pairs, as Caddy's `buildEnv` makes them.
    fn params(
        &self,
        parts: &hyper::http::request::Parts,
        path: &str,
        ctx: &FastCgiContext,
        length: u64,
    ) -> Vec<u8> {
        let request_root;
        let root = match &ctx.root {
            Some(r) => {
                request_root = document_root(r, self.config.resolve_root_symlink);
                &request_root
            }
            None => &self.document_root,
        };
        let split = self.split_pos(path);
        let (doc_uri, mut path_info) = match split {
            Some(pos) => (&path[..pos], path[pos..].to_owned()),
            None => (path, String::new()),
        };
        let script_name = match split {
            Some(_) => path.strip_suffix(path_info.as_str()).unwrap_or(path),
            None => path,
        };
        if path_info.is_empty()
            && let Some(remainder) = &ctx.file_remainder
        {
            path_info = remainder.clone();
        }
        let script_filename = join(std::path::Path::new(root), script_name);
        let script_name = if !script_name.is_empty() && !script_name.starts_with('/') {
            format!("/{script_name}")
        } else {
            script_name.to_owned()
        };

        let original = parts
            .extensions
            .get::<OriginalUri>()
            .map_or(&parts.uri, |o| &o.0);
        let request_uri = original
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let host = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let (server_name, server_port) = match crate::site::split_host_port(&host) {
            Some((name, Some(port))) => (name.to_owned(), port.to_string()),
            Some((name, None)) => (name.to_owned(), String::new()),
            None => (host.clone(), String::new()),
        };
        let server_port = if !server_port.is_empty() {
            server_port
        } else if ctx.https {
            "443".to_owned()
        } else {
            "80".to_owned()
        };
        let scheme = if ctx.https { "https" } else { "http" };
        let method = match parts.method {
            Method::GET | Method::HEAD | Method::OPTIONS => parts.method.as_str().to_owned(),
            ref other => other.as_str().to_ascii_uppercase(),
        };
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let content_type = match (&parts.method, content_type) {
            (&Method::GET | &Method::HEAD | &Method::OPTIONS, ct) => ct.unwrap_or_default(),
            (_, Some(ct)) if !ct.is_empty() => ct,
            // Caddy's default for a body without a type.
            _ => "application/x-www-form-urlencoded".to_owned(),
        };
        let protocol = match parts.version {
            hyper::http::Version::HTTP_10 => "HTTP/1.0",
            hyper::http::Version::HTTP_2 => "HTTP/2.0",
            hyper::http::Version::HTTP_3 => "HTTP/3.0",
            _ => "HTTP/1.1",
        };
        let ip = ctx.remote_addr.ip().to_string();
        let ip = ip.trim_start_matches("::ffff:").to_owned();

        let mut env: Vec<(String, String)> = vec![
            ("AUTH_TYPE".into(), String::new()),
            ("CONTENT_LENGTH".into(), length.to_string()),
            ("CONTENT_TYPE".into(), content_type),
            ("GATEWAY_INTERFACE".into(), "CGI/1.1".into()),
            ("PATH_INFO".into(), path_info.clone()),
            (
                "QUERY_STRING".into(),
                parts.uri.query().unwrap_or("").to_owned(),
            ),
            ("REMOTE_ADDR".into(), ip.clone()),
            ("REMOTE_HOST".into(), ip),
            ("REMOTE_PORT".into(), ctx.remote_addr.port().to_string()),
            ("REMOTE_IDENT".into(), String::new()),
            (
                "REMOTE_USER".into(),
                ctx.remote_user.clone().unwrap_or_default(),
            ),
            ("REQUEST_METHOD".into(), method),
            ("REQUEST_SCHEME".into(), scheme.into()),
            ("SERVER_NAME".into(), server_name),
            ("SERVER_PROTOCOL".into(), protocol.into()),
            ("SERVER_SOFTWARE".into(), self.software.clone()),
            ("DOCUMENT_ROOT".into(), root.clone()),
            ("DOCUMENT_URI".into(), doc_uri.to_owned()),
            ("HTTP_HOST".into(), host.clone()),
            ("REQUEST_URI".into(), request_uri),
            (
                "SCRIPT_FILENAME".into(),
                script_filename.to_string_lossy().into_owned(),
            ),
            ("SCRIPT_NAME".into(), script_name),
            ("SERVER_PORT".into(), server_port),
        ];
        if !path_info.is_empty() {
            let translated = join(std::path::Path::new(root), &path_info);
            env.push((
                "PATH_TRANSLATED".into(),
                translated.to_string_lossy().into_owned(),
            ));
        }
        if ctx.https {
            env.push(("HTTPS".into(), "on".into()));
            if let Some(protocol) = &ctx.ssl_protocol {
                env.push(("SSL_PROTOCOL".into(), protocol.clone()));
            }
            if let Some(cipher) = &ctx.ssl_cipher {
                env.push(("SSL_CIPHER".into(), cipher.clone()));
            }
        }
        for (key, value) in &self.config.env {
            set(&mut env, key, value.clone());
        }
        // The client's headers as HTTP_*, after what reverse_proxy does to them: hop-by-hop
        // headers out, X-Forwarded-* set to what this connection saw.
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        let forwarded = [
            ("x-forwarded-for", ctx.remote_addr.ip().to_string()),
            ("x-forwarded-proto", scheme.to_owned()),
            ("x-forwarded-host", host),
        ];
        for (name, value) in forwarded {
            if let Ok(value) = HeaderValue::from_str(value.trim_start_matches("::ffff:")) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
        // Go's proxy sends an empty User-Agent rather than none, and PHP apps see it so.
        if !headers.contains_key(header::USER_AGENT) {
            headers.insert(header::USER_AGENT, HeaderValue::from_static(""));
        }
        for name in headers.keys() {
            // `Proxy` would become HTTP_PROXY, which CGI programs take as their outgoing proxy
            // (httpoxy); a name with `_` could pose as another header once `-` becomes `_`.
            if name.as_str() == "proxy" || name.as_str().contains('_') {
                continue;
            }
            let values: Vec<String> = headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            let key = format!(
                "HTTP_{}",
                name.as_str().to_ascii_uppercase().replace(['-', ' '], "_")
            );
            set(&mut env, &key, values.join(", "));
        }

        let mut out = Vec::with_capacity(4096);
        for (key, value) in &env {
            push_pair(&mut out, key.as_bytes(), value.as_bytes());
        }
        out
    }

    /// Caddy's `splitPos`: just after the first split extension found anywhere in the path
    /// (case-insensitive); `Some(0)` when none is configured.
    fn split_pos(&self, path: &str) -> Option<usize> {
        if self.config.split_path.is_empty() {
            return Some(0);
        }
        let lower = path.to_ascii_lowercase();
        self.config.split_path.iter().find_map(|split| {
            lower
                .find(&split.to_ascii_lowercase())
                .map(|idx| idx + split.len())
        })
    }
}

/// DOCUMENT_ROOT for `root`: absolute, and with `resolve` its symlinks resolved.
fn document_root(root: &Path, resolve: bool) -> String {
    let mut root = std::path::absolute(root).unwrap_or_else(|_| root.to_owned());
    if resolve && let Ok(real) = std::fs::canonicalize(&root) {
        root = real;
    }
    root.to_string_lossy().into_owned()
}

/// The error and its sources on one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: String) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value,
        None => env.push((key.to_owned(), value)),
    }
}

/// Hop-by-hop headers (RFC 9110 7.6.1, and the ones `Connection` names): not for the script.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    crate::proxy::remove_connection_named(headers);
    for name in [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("alt-svc"),
    ] {
        headers.remove(name);
    }
}

/// A body of unknown length, collected up to [`MAX_UNSIZED_BODY`].
async fn collect_bounded(mut body: ReqBody) -> Result<Bytes, Failure> {
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Failure::Client)?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_UNSIZED_BODY {
                return Err(Failure::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// Appends one record (padded to 8 bytes, as the spec recommends).
fn push_record(out: &mut Vec<u8>, kind: u8, content: &[u8]) {
    debug_assert!(
        content.len() <= MAX_RECORD,
        "record content fits in 16 bits"
    );
    let padding = (8 - content.len() % 8) % 8;
    out.extend_from_slice(&[VERSION, kind]);
    out.extend_from_slice(&REQUEST_ID.to_be_bytes());
    out.extend_from_slice(&(content.len() as u16).to_be_bytes());
    out.extend_from_slice(&[padding as u8, 0]);
    out.extend_from_slice(content);
    out.extend_from_slice(&[0u8; 8][..padding]);
}

/// Appends a name-value pair: lengths below 128 in one byte, others in four with the top bit set.
fn push_pair(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    for len in [name.len(), value.len()] {
        if len < 128 {
            out.push(len as u8);
        } else {
            let len = u32::try_from(len).unwrap_or(u32::MAX >> 1) & 0x7fff_ffff;
            out.extend_from_slice(&(len | 0x8000_0000).to_be_bytes());
        }
    }
    out.extend_from_slice(name);
    out.extend_from_slice(value);
}

async fn write_all(
    conn: &mut Box<dyn Conn>,
    bytes: &[u8],
    deadline: Option<Instant>,
    address: &str,
) -> Result<(), Failure> {
    let deadline = deadline.unwrap_or_else(|| Instant::now() + IDLE_WRITE);
    match tokio::time::timeout_at(deadline, conn.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(Failure::Io {
            address: address.to_owned(),
            source,
        }),
        Err(_) => Err(Failure::Timeout(address.to_owned())),
    }
}

async fn write_stdin(
    conn: &mut Box<dyn Conn>,
    data: &[u8],
    deadline: Option<Instant>,
    address: &str,
) -> Result<(), Failure> {
    let mut records = Vec::with_capacity(data.len() + 16 * (data.len() / MAX_RECORD + 1));
    for chunk in data.chunks(MAX_RECORD) {
        push_record(&mut records, STDIN, chunk);
    }
    write_all(conn, &records, deadline, address).await
}

/// The upstream's records, read one at a time.
struct Records {
    conn: BufReader<Box<dyn Conn>>,
    deadline: Option<Instant>,
    address: String,
    stderr_logged: usize,
    ended: bool,
}

impl Records {
    /// The next STDOUT content, `None` at END_REQUEST. STDERR is logged on the way.
    async fn next_stdout(&mut self) -> Result<Option<Bytes>, Failure> {
        loop {
            if self.ended {
                return Ok(None);
            }
            let mut head = [0u8; 8];
            self.read_exact(&mut head).await?;
            let kind = head[1];
            let id = u16::from_be_bytes([head[2], head[3]]);
            let length = usize::from(u16::from_be_bytes([head[4], head[5]]));
            let padding = usize::from(head[6]);
            if head[0] != VERSION {
                return Err(self.protocol(format!("record version {}", head[0])));
            }
            let mut content = BytesMut::zeroed(length + padding);
            self.read_exact(&mut content).await?;
            content.truncate(length);
            if id != REQUEST_ID {
                // Management records (id 0) and strays are not ours.
                continue;
            }
            match kind {
                STDOUT if length > 0 => return Ok(Some(content.freeze())),
                STDOUT => {}
                STDERR => self.log_stderr(&content),
                END_REQUEST => {
                    self.ended = true;
                    return Ok(None);
                }
                _ => {}
            }
        }
    }

    async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Failure> {
        let deadline = self.deadline.unwrap_or_else(|| Instant::now() + IDLE_READ);
        match tokio::time::timeout_at(deadline, self.conn.read_exact(buf)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(self.protocol("the connection closed before the end of the request".into()))
            }
            Ok(Err(source)) => Err(Failure::Io {
                address: self.address.clone(),
                source,
            }),
            Err(_) => Err(Failure::Timeout(self.address.clone())),
        }
    }

    fn protocol(&self, what: String) -> Failure {
        Failure::Protocol {
            address: self.address.clone(),
            what,
        }
    }

    /// Logs what the script wrote to STDERR, up to [`MAX_STDERR_LOGGED`] bytes per request.
    fn log_stderr(&mut self, content: &[u8]) {
        let room = MAX_STDERR_LOGGED.saturating_sub(self.stderr_logged);
        if room == 0 || content.is_empty() {
            return;
        }
        let shown = &content[..content.len().min(room)];
        self.stderr_logged += shown.len();
        let text = String::from_utf8_lossy(shown);
        tracing::warn!(upstream = %self.address, stderr = %text.trim_end(), "php_fastcgi stderr");
    }
}

/// Where the header block ends: its end (without the blank line) and the body's start.
/// Bare `\n` line ends are accepted, as Go's textproto accepts them.
fn header_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while let Some(off) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + off;
        let next = nl + 1;
        let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
            nl - 1
        } else {
            nl
        };
        if buf.get(next) == Some(&b'\n') {
            return Some((line_end, next + 1));
        }
        if buf.get(next) == Some(&b'\r') && buf.get(next + 1) == Some(&b'\n') {
            return Some((line_end, next + 2));
        }
        // An empty first line: no headers at all.
        if nl == 0 || (nl == 1 && buf[0] == b'\r') {
            return Some((0, next));
        }
        i = next;
    }
    None
}

/// The status and headers of a CGI header block (`Status: 404 Not Found`, then fields).
fn parse_head(block: &[u8]) -> Result<(StatusCode, HeaderMap), String> {
    let mut headers = HeaderMap::new();
    let mut status = StatusCode::OK;
    let mut last: Option<HeaderName> = None;
    for line in block.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            // An obsolete folded line continues the previous field.
            let Some(name) = &last else {
                return Err("a header block starting with a continuation line".into());
            };
            let previous = headers
                .get(name)
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default();
            let mut joined = previous;
            joined.push(b' ');
            joined.extend_from_slice(line.trim_ascii());
            let value =
                HeaderValue::from_bytes(&joined).map_err(|_| "a bad header value".to_owned())?;
            headers.insert(name.clone(), value);
            continue;
        }
        let colon = line.iter().position(|&b| b == b':').ok_or_else(|| {
            format!(
                "a header line without a colon: {:?}",
                String::from_utf8_lossy(&line[..line.len().min(64)])
            )
        })?;
        let name = HeaderName::from_bytes(&line[..colon]).map_err(|_| {
            format!(
                "a bad header name: {:?}",
                String::from_utf8_lossy(&line[..colon.min(64)])
            )
        })?;
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii())
            .map_err(|_| format!("a bad value for {name}"))?;
        if name.as_str() == "status" {
            let text = value.to_str().map_err(|_| "a bad Status".to_owned())?;
            let code = text.split(' ').next().unwrap_or("");
            status = code
                .parse::<u16>()
                .ok()
                .filter(|c| (200..=999).contains(c))
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| format!("a bad Status: {text:?}"))?;
            last = None;
            continue;
        }
        headers.append(name.clone(), value);
        last = Some(name);
    }
    strip_hop_by_hop(&mut headers);
    if let Some(length) = headers.get(header::CONTENT_LENGTH)
        && length
            .to_str()
            .ok()
            .and_then(|l| l.parse::<u64>().ok())
            .is_none()
    {
        return Err("a bad Content-Length".into());
    }
    Ok((status, headers))
}

#[cfg(test)]
mod tests {
    //! Against real php-fpm (Debian's `php-fpm8.2`), run in the foreground with a pool
    //! config written for the test, serving a WordPress-shaped folder.

    use std::net::SocketAddr;
    use std::sync::Arc;

    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    use testkit::php::PhpFpm;
    use testkit::{Proc, ProcBuilder, Scratch};

    use super::*;

    /// A WordPress-shaped site: a front controller, a subfolder app, and pages that test
    /// bodies, statuses, headers, streaming and misbehaviour.
    fn site(dir: &Scratch) -> PathBuf {
        let root = dir.join("site");
        let write = |name: &str, body: &str| {
            let path = root.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        };
        let dump = "<?php header('Content-Type: application/json'); echo json_encode($_SERVER) ?: json_last_error_msg();";
        write("index.php", dump);
        write("info.php", dump);
        write("sub/index.php", dump);
        write("style.css", "body{}");
        write(
            "echo.php",
            "<?php $in = file_get_contents('php://input'); \
             echo $_SERVER['REQUEST_METHOD'], ' ', $_SERVER['CONTENT_LENGTH'], ' ', \
             $_SERVER['CONTENT_TYPE'], ' ', strlen($in), ' ', md5($in);",
        );
        write(
            "status.php",
            "<?php http_response_code(418); header('X-Teapot: yes'); \
             setcookie('a', '1'); setcookie('b', '2'); error_log('teapot warned'); \
             echo 'short and stout';",
        );
        write(
            "big.php",
            "<?php for ($i = 0; $i < 5000; $i++) { echo str_repeat(chr(65 + $i % 26), 1023), \"\\n\"; flush(); }",
        );
        write(
            "bigheader.php",
            "<?php header('X-Huge: ' . str_repeat('h', 100000)); echo 'never';",
        );
        write("slow.php", "<?php sleep(3); echo 'late';");
        root
    }

    /// `fcgi` behind a bare HTTP/1.1 server, with php_fastcgi's routes in front as the handler
    /// chain will put them.
    async fn start_edge(fcgi: FastCgi) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fcgi = Arc::new(fcgi);
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    return;
                };
                let fcgi = fcgi.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let fcgi = fcgi.clone();
                            async move {
                                Ok::<_, std::convert::Infallible>(
                                    route_and_serve(&fcgi, req, peer).await,
                                )
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

    async fn route_and_serve(
        fcgi: &FastCgi,
        mut req: Request<hyper::body::Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let path = crate::site::match_path(req.uri().path())
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .unwrap_or_default();
        let mut ctx = FastCgiContext {
            remote_addr: peer,
            https: false,
            ssl_protocol: None,
            ssl_cipher: None,
            remote_user: None,
            file_remainder: None,
            root: None,
        };
        let script = match fcgi.route(&path) {
            PhpRoute::Redirect(to) => {
                let mut response =
                    Response::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
                *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
                response
                    .headers_mut()
                    .insert(header::LOCATION, HeaderValue::from_str(&to).unwrap());
                return response;
            }
            PhpRoute::Rewrite { path, remainder } => {
                let original = req.uri().clone();
                let uri = match original.query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path.clone(),
                };
                *req.uri_mut() = uri.parse().unwrap();
                req.extensions_mut().insert(OriginalUri(original));
                ctx.file_remainder = Some(remainder);
                path
            }
            PhpRoute::AsIs => path,
        };
        if !fcgi.is_script(&script) {
            let mut response = Response::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
            *response.status_mut() = StatusCode::NOT_FOUND;
            return response;
        }
        fcgi.serve(req.map(ReqBody::Hyper), &ctx).await
    }

    /// A request: method, path, headers, body.
    type Exchange = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static [u8],
    );

    struct Answer {
        status: u16,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    impl Answer {
        fn server(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap_or_else(|e| {
                panic!(
                    "{e}: {} {:?} {}",
                    self.status,
                    self.headers,
                    String::from_utf8_lossy(&self.body)
                )
            })
        }
    }

    async fn fetch<B>(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: B,
    ) -> (Answer, u16)
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let local_port = stream.local_addr().unwrap().port();
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
        let req = req.body(body).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
            .await
            .expect("an answer within 30 s")
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
        (
            Answer {
                status,
                headers,
                body,
            },
            local_port,
        )
    }

    async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (Answer, u16) {
        fetch(addr, "GET", path, headers, Empty::<Bytes>::new()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn php_fpm_runs_a_wordpress_shaped_site_through_fastcgi() {
        let dir = Scratch::new("edge-fastcgi").unwrap();
        let root = site(&dir);
        let fpm = PhpFpm::start(&dir, 1).expect("php-fpm starts");
        let tcp = FastCgiAddress::parse(&format!("127.0.0.1:{}", fpm.port)).unwrap();
        let edge = start_edge(FastCgi::new(FastCgiConfig {
            env: vec![("APP_ENV".into(), "test".into())],
            ..FastCgiConfig::new(tcp, &root)
        }))
        .await;
        let root_text = root.display().to_string();

        // The parameters a PHP app reads from $_SERVER.
        let (answer, client_port) = get(
            edge,
            "/index.php?x=1&y=%20",
            &[("x-custom", "hi"), ("x-custom", "there")],
        )
        .await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.headers["content-type"], "application/json");
        let server = answer.server();
        let expect = [
            ("SCRIPT_FILENAME", format!("{root_text}/index.php")),
            ("SCRIPT_NAME", "/index.php".to_owned()),
            ("DOCUMENT_ROOT", root_text.clone()),
            ("DOCUMENT_URI", "/index.php".to_owned()),
            ("REQUEST_URI", "/index.php?x=1&y=%20".to_owned()),
            ("QUERY_STRING", "x=1&y=%20".to_owned()),
            ("REQUEST_METHOD", "GET".to_owned()),
            ("REQUEST_SCHEME", "http".to_owned()),
            ("REMOTE_ADDR", "127.0.0.1".to_owned()),
            ("REMOTE_PORT", client_port.to_string()),
            ("SERVER_NAME", "127.0.0.1".to_owned()),
            ("SERVER_PORT", edge.port().to_string()),
            ("SERVER_PROTOCOL", "HTTP/1.1".to_owned()),
            ("GATEWAY_INTERFACE", "CGI/1.1".to_owned()),
            ("HTTP_HOST", format!("127.0.0.1:{}", edge.port())),
            ("HTTP_X_CUSTOM", "hi, there".to_owned()),
            ("HTTP_X_FORWARDED_FOR", "127.0.0.1".to_owned()),
            ("HTTP_X_FORWARDED_PROTO", "http".to_owned()),
            ("PATH_INFO", String::new()),
            ("CONTENT_LENGTH", "0".to_owned()),
            ("APP_ENV", "test".to_owned()),
        ];
        for (key, value) in expect {
            assert_eq!(server[key], value, "$_SERVER['{key}'] in {server:#}");
        }
        assert!(
            server.get("HTTPS").is_none(),
            "HTTPS over plain HTTP: {server:#}"
        );
        assert!(server.get("PATH_TRANSLATED").is_none());

        // A deliberate difference from Caddy: a header whose `_` would let it pose as another
        // once `-` becomes `_` (an X-Auth-User a front proxy strips) is not passed on.
        let (answer, _) = get(edge, "/index.php", &[("x_auth_user", "admin")]).await;
        let server = answer.server();
        assert!(server.get("HTTP_X_AUTH_USER").is_none(), "{server:#}");

        // A pretty permalink goes to the front controller; REQUEST_URI stays what was asked.
        let (answer, _) = get(edge, "/2026/12/hello-world/?p=3", &[]).await;
        assert_eq!(answer.status, 200);
        let server = answer.server();
        assert_eq!(server["SCRIPT_NAME"], "/index.php");
        assert_eq!(server["REQUEST_URI"], "/2026/12/hello-world/?p=3");
        assert_eq!(server["QUERY_STRING"], "p=3");

        // A folder with an index script: the slash form first, then its script.
        let (answer, _) = get(edge, "/sub", &[]).await;
        assert_eq!(
            (answer.status, answer.headers["location"].to_str().unwrap()),
            (308, "/sub/")
        );
        let (answer, _) = get(edge, "/sub/", &[]).await;
        assert_eq!(
            answer.server()["SCRIPT_FILENAME"],
            format!("{root_text}/sub/index.php")
        );

        // PATH_INFO after the script.
        let (answer, _) = get(edge, "/info.php/extra/path", &[]).await;
        let server = answer.server();
        assert_eq!(server["SCRIPT_NAME"], "/info.php");
        assert_eq!(server["PATH_INFO"], "/extra/path");
        assert_eq!(server["PATH_TRANSLATED"], format!("{root_text}/extra/path"));

        // Not a script: php_fastcgi leaves it to the next handler.
        let (answer, _) = get(edge, "/style.css", &[]).await;
        assert_eq!(answer.status, 404);

        // A large POST body, streamed up, arrives whole.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let digest = md5_of(&big);
        let (answer, _) = fetch(
            edge,
            "POST",
            "/echo.php",
            &[("content-type", "application/octet-stream")],
            Full::new(Bytes::from(big.clone())),
        )
        .await;
        assert_eq!(
            String::from_utf8_lossy(&answer.body),
            format!("POST 3000000 application/octet-stream 3000000 {digest}")
        );
        // Without a Content-Length (chunked), and without a type.
        let chunks = futures_util::stream::iter(
            [&b"hello "[..], b"chunked ", b"world"]
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c)))),
        );
        let (answer, _) = fetch(edge, "PUT", "/echo.php", &[], StreamBody::new(chunks)).await;
        assert_eq!(
            String::from_utf8_lossy(&answer.body),
            format!(
                "PUT 19 application/x-www-form-urlencoded 19 {}",
                md5_of(b"hello chunked world")
            )
        );

        // Status and headers the script sets; CGI's Status field is not passed on.
        let (answer, _) = get(edge, "/status.php", &[]).await;
        assert_eq!(answer.status, 418);
        assert_eq!(answer.headers["x-teapot"], "yes");
        let cookies: Vec<_> = answer.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert!(answer.headers.get("status").is_none());
        assert_eq!(answer.body, b"short and stout");
        let (answer, _) = fetch(edge, "HEAD", "/status.php", &[], Empty::<Bytes>::new()).await;
        assert_eq!((answer.status, answer.body.len()), (418, 0));

        // A large output streams through whole.
        let (answer, _) = get(edge, "/big.php", &[]).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body.len(), 5000 * 1024);
        assert!(answer.body.chunks(1024).enumerate().all(|(i, line)| {
            line[..1023].iter().all(|&b| b == b'A' + (i % 26) as u8) && line[1023] == b'\n'
        }));

        // A header block over the bound is refused, not passed on.
        let (answer, _) = get(edge, "/bigheader.php", &[]).await;
        assert_eq!(answer.status, 502);
        assert!(answer.headers.get("x-huge").is_none());
    }

    fn md5_of(data: &[u8]) -> String {
        let out = std::process::Command::new("md5sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(data)?;
                child.wait_with_output()
            })
            .unwrap();
        String::from_utf8(out.stdout).unwrap()[..32].to_owned()
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn php_sees_the_same_server_variables_through_edge_as_through_caddy() {
        let dir = Scratch::new("edge-fastcgi-caddy").unwrap();
        let root = site(&dir);
        let fpm = PhpFpm::start(&dir, 1).expect("php-fpm starts");
        let caddyfile = format!(
            "{{\n\tadmin off\n}}\nhttp://127.0.0.1:PORT {{\n\troot * {}\n\t\
             php_fastcgi 127.0.0.1:{} {{\n\t\tenv APP_ENV test\n\t}}\n\tfile_server\n}}\n",
            root.display(),
            fpm.port
        );
        let (_caddy, caddy_port) = start_caddy(&dir, &caddyfile);
        let caddy: SocketAddr = ([127, 0, 0, 1], caddy_port).into();
        let tcp = FastCgiAddress::parse(&format!("127.0.0.1:{}", fpm.port)).unwrap();
        let edge = start_edge(FastCgi::new(FastCgiConfig {
            env: vec![("APP_ENV".into(), "test".into())],
            ..FastCgiConfig::new(tcp, &root)
        }))
        .await;

        // What differs by nature: ports, times, the server's name.
        let differ_by_nature = [
            "REMOTE_PORT",
            "SERVER_PORT",
            "HTTP_HOST",
            "HTTP_X_FORWARDED_HOST",
            "SERVER_SOFTWARE",
            "REQUEST_TIME",
            "REQUEST_TIME_FLOAT",
        ];
        let requests: [Exchange; 7] = [
            (
                "GET",
                "/index.php?x=1&y=%20",
                &[("x-custom", "hi"), ("cookie", "a=1")],
                b"",
            ),
            ("GET", "/2026/12/hello-world/?p=3", &[], b""),
            ("GET", "/sub/", &[], b""),
            ("GET", "/info.php/extra/path", &[], b""),
            (
                "GET",
                "/wp-admin/",
                &[("connection", "keep-alive, x-hop"), ("x-hop", "1")],
                b"",
            ),
            (
                "POST",
                "/index.php",
                &[("content-type", "application/x-www-form-urlencoded")],
                b"a=1&b=2",
            ),
            ("DELETE", "/index.php?id=4", &[], b""),
        ];
        let mut differences = Vec::new();
        for (method, path, headers, body) in requests {
            let body = || Full::new(Bytes::from_static(body));
            let (want, _) = fetch(caddy, method, path, headers, body()).await;
            let (got, _) = fetch(edge, method, path, headers, body()).await;
            let case = format!("{method} {path}");
            assert_eq!(got.status, want.status, "{case}");
            let (want, got) = (want.server(), got.server());
            let (want, got) = (want.as_object().unwrap(), got.as_object().unwrap());
            for key in want.keys().chain(got.keys()) {
                if differ_by_nature.contains(&key.as_str()) {
                    continue;
                }
                if want.get(key) != got.get(key) {
                    differences.push(format!(
                        "{case}: {key} is {:?} through caddy, {:?} through edge",
                        want.get(key),
                        got.get(key)
                    ));
                }
            }
        }
        differences.dedup();
        assert!(differences.is_empty(), "{}", differences.join("\n"));
        for (method, path) in [("GET", "/sub"), ("HEAD", "/sub")] {
            let (want, _) = fetch(caddy, method, path, &[], Empty::<Bytes>::new()).await;
            let (got, _) = fetch(edge, method, path, &[], Empty::<Bytes>::new()).await;
            assert_eq!(
                (got.status, got.headers.get("location")),
                (want.status, want.headers.get("location"))
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn php_fpm_on_a_unix_socket_serves_and_a_slow_script_times_out_with_504() {
        let dir = Scratch::new("edge-fastcgi-unix").unwrap();
        let root = site(&dir);
        let fpm = PhpFpm::start(&dir, 1).expect("php-fpm starts");
        let unix = FastCgiAddress::parse(&format!("unix/{}", fpm.socket.display())).unwrap();
        let edge = start_edge(FastCgi::new(FastCgiConfig {
            read_timeout: Some(Duration::from_millis(500)),
            ..FastCgiConfig::new(unix, &root)
        }))
        .await;
        let (answer, _) = get(edge, "/status.php", &[]).await;
        assert_eq!(
            (answer.status, answer.body.as_slice()),
            (418, &b"short and stout"[..])
        );
        let (answer, _) = get(edge, "/slow.php", &[]).await;
        assert_eq!(answer.status, 504);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_php_fpm_is_a_502() {
        let dir = Scratch::new("edge-fastcgi-dead").unwrap();
        let root = site(&dir);
        let port = testkit::ports::free_port().unwrap();
        for address in [
            format!("127.0.0.1:{port}"),
            format!("unix/{}", dir.join("gone.sock").display()),
        ] {
            let address = FastCgiAddress::parse(&address).unwrap();
            let edge = start_edge(FastCgi::new(FastCgiConfig::new(address.clone(), &root))).await;
            let (answer, _) = get(edge, "/index.php", &[]).await;
            assert_eq!(answer.status, 502, "{address}");
        }
    }

    #[test]
    fn upstream_addresses_parse_as_caddyfiles_write_them() {
        let ok = |text: &str| FastCgiAddress::parse(text).unwrap();
        assert_eq!(
            ok("127.0.0.1:9000"),
            FastCgiAddress::Tcp("127.0.0.1:9000".into())
        );
        assert_eq!(ok("php:9000"), FastCgiAddress::Tcp("php:9000".into()));
        assert_eq!(
            ok("unix//run/php/php8.2-fpm.sock"),
            FastCgiAddress::Unix("/run/php/php8.2-fpm.sock".into())
        );
        assert!(FastCgiAddress::parse("php").is_err());
        assert!(FastCgiAddress::parse("unix/relative.sock").is_err());
    }

    #[test]
    fn cgi_header_blocks_parse_with_bounds_and_refusals() {
        let (status, headers) =
            parse_head(b"Status: 404 Not Found\r\nX-A: 1\r\nX-A: 2\r\nContent-Type: text/html")
                .unwrap();
        assert_eq!(status, 404);
        assert_eq!(headers.get_all("x-a").iter().count(), 2);
        assert!(headers.get("status").is_none());
        let (_, headers) =
            parse_head(b"Connection: close\nTransfer-Encoding: chunked\nX-B: 1").unwrap();
        assert_eq!(
            headers.len(),
            1,
            "hop-by-hop headers from the script are dropped"
        );
        assert!(parse_head(b"no colon here").is_err());
        assert!(parse_head(b"Status: abc").is_err());
        assert!(parse_head(b"Status: 42").is_err());
        assert!(parse_head(b"Bad Name: x").is_err());
        assert!(parse_head(b"X: \x01").is_err());
        assert!(parse_head(b"Content-Length: -1").is_err());
        assert_eq!(header_end(b"A: 1\r\n\r\nbody"), Some((4, 8)));
        assert_eq!(header_end(b"A: 1\n\nbody"), Some((4, 6)));
        assert_eq!(header_end(b"\r\nbody"), Some((0, 2)));
        assert_eq!(header_end(b"A: 1\r\nB: 2"), None);
    }

    #[test]
    fn no_http_proxy_parameter_comes_from_a_proxy_header() {
        // httpoxy: CGI programs take HTTP_PROXY as their outgoing proxy. php-fpm drops it
        // itself, other FastCGI servers may not.
        let fcgi = FastCgi::new(FastCgiConfig::new(
            FastCgiAddress::Tcp("127.0.0.1:9".into()),
            "/srv",
        ));
        let (parts, ()) = Request::get("/index.php")
            .header("proxy", "http://evil:3128")
            .header("x-real", "1")
            .body(())
            .unwrap()
            .into_parts();
        let ctx = FastCgiContext {
            remote_addr: ([127, 0, 0, 1], 1234).into(),
            https: false,
            ssl_protocol: None,
            ssl_cipher: None,
            remote_user: None,
            file_remainder: None,
            root: None,
        };
        let params = fcgi.params(&parts, "/index.php", &ctx, 0);
        let mut names = Vec::new();
        let mut rest = &params[..];
        while !rest.is_empty() {
            let mut lengths = [0usize; 2];
            for length in &mut lengths {
                if rest[0] < 128 {
                    *length = usize::from(rest[0]);
                    rest = &rest[1..];
                } else {
                    *length =
                        (u32::from_be_bytes(rest[..4].try_into().unwrap()) & 0x7fff_ffff) as usize;
                    rest = &rest[4..];
                }
            }
            names.push(String::from_utf8(rest[..lengths[0]].to_vec()).unwrap());
            rest = &rest[lengths[0] + lengths[1]..];
        }
        assert!(names.contains(&"HTTP_X_REAL".to_owned()), "{names:?}");
        assert!(!names.contains(&"HTTP_PROXY".to_owned()), "{names:?}");
    }

    #[test]
    fn name_value_pairs_use_four_byte_lengths_from_128() {
        let mut out = Vec::new();
        push_pair(&mut out, b"A", &[b'x'; 127]);
        assert_eq!(&out[..2], &[1, 127]);
        out.clear();
        push_pair(&mut out, b"A", &[b'x'; 128]);
        assert_eq!(&out[..5], &[1, 0x80, 0, 0, 128]);
        let mut record = Vec::new();
        push_record(&mut record, STDIN, b"abc");
        assert_eq!(
            record,
            [1, 5, 0, 1, 0, 3, 5, 0, b'a', b'b', b'c', 0, 0, 0, 0, 0]
        );
    }
}
