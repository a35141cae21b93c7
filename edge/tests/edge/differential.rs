//! Differential testing against Caddy: one Caddyfile template is served by the edge and by
//! Debian's `caddy` (2.6) at once, each on its own ports, and every request goes to both so a
//! test compares what a user of either would see.
//!
//! The template is an ordinary Caddyfile with `@NAME@` markers for what the test makes at run
//! time: `@ECHO@` is always the address of an echo upstream (see [`Upstreams::echo`]), `@DIR@`
//! a scratch folder, empty at start, for templates that need a path (a site root, a log file);
//! other markers come from [`Both::start_with`]. The harness puts its own global options in front
//! (free ports, loopback, scratch storage, `admin off`), merged into the template's global
//! block if it has one, so the two files differ only in ports and storage folders.
//!
//! Invariants: both servers run from the same template and see byte-identical requests
//! (written on a raw socket, so no client tidies the target); readiness is each server's
//! sd_notify `READY=1`, never a sleep; Caddy gets a HOME and XDG folders of its own, so it
//! neither reads nor writes the machine's Caddy state, and `skip_install_trust` so a test with
//! `tls internal` leaves the system trust store alone.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;

use testkit::{Proc, ProcBuilder, Scratch};

use crate::support::{EDGE, Upstreams, WAIT};

/// Debian's Caddy, the reference; scripts/test installs it.
pub const CADDY: &str = "/usr/bin/caddy";

/// The Host header a request carries unless the test names another.
pub const DEFAULT_HOST: &str = "plain.local";

/// The edge and Caddy serving one template, with the upstreams it proxies to.
pub struct Both {
    edge: Proc,
    caddy: Proc,
    edge_port: u16,
    caddy_port: u16,
    /// The HTTPS ports: (edge, caddy).
    pub https_ports: (u16, u16),
    /// The upstream servers, which run as long as the two servers do.
    _upstreams: Upstreams,
    /// Holds the two Caddyfiles, storage and Caddy's home (and `@DIR@`); removed when the
    /// test ends.
    _dir: Scratch,
}

impl Both {
    /// Starts both servers on `template`, with `@ECHO@` set to a fresh echo upstream.
    pub fn start(template: &str) -> Both {
        Both::start_with(Upstreams::new(), template, &[])
    }

    /// Starts both servers on `template`, with `@ECHO@` set to a fresh echo upstream on
    /// `upstreams` and each `(marker, value)` of `vars` substituted.
    pub fn start_with(upstreams: Upstreams, template: &str, vars: &[(&str, String)]) -> Both {
        let echo = upstreams.echo();
        let dir = Scratch::new("edge-differential").unwrap();
        let files = dir.join("files");
        std::fs::create_dir(&files).unwrap();
        let mut text = template
            .replace("@ECHO@", &echo.to_string())
            .replace("@DIR@", &files.display().to_string());
        for (marker, value) in vars {
            text = text.replace(marker, value);
        }
        let (edge, (edge_port, edge_https)) = testkit::ports::retry_on_port_clash(|attempt| {
            let file = dir.join(format!("edge-{attempt}.Caddyfile"));
            let port = write_config(&file, &text, &dir.join("edge"), "")?;
            let edge = ProcBuilder::new(EDGE)
                .args(["run".as_ref(), "--caddyfile".as_ref(), file.as_os_str()])
                .env(
                    "LABKIT_LOG",
                    std::env::var("EDGE_TEST_LOG").unwrap_or("info,edge=debug".into()),
                )
                .notify()
                .spawn()?;
            edge.wait_ready(WAIT)?;
            Ok((edge, port))
        })
        .unwrap_or_else(|e| panic!("the edge did not start on the template:\n{text}\n{e}"));
        let (caddy, (caddy_port, caddy_https)) = testkit::ports::retry_on_port_clash(|attempt| {
            let file = dir.join(format!("caddy-{attempt}.Caddyfile"));
            let port = write_config(&file, &text, &dir.join("caddy"), "\tskip_install_trust\n")?;
            let caddy = ProcBuilder::new(CADDY)
                .args([
                    "run".as_ref(),
                    "--config".as_ref(),
                    file.as_os_str(),
                    "--adapter".as_ref(),
                    "caddyfile".as_ref(),
                ])
                .env("HOME", dir.join("caddy/home"))
                .env("XDG_DATA_HOME", dir.join("caddy/data"))
                .env("XDG_CONFIG_HOME", dir.join("caddy/config"))
                .notify()
                .spawn()?;
            caddy.wait_ready(WAIT)?;
            Ok((caddy, port))
        })
        .unwrap_or_else(|e| panic!("caddy did not start on the template:\n{text}\n{e}"));
        Both {
            edge,
            caddy,
            edge_port,
            caddy_port,
            https_ports: (edge_https, caddy_https),
            _upstreams: upstreams,
            _dir: dir,
        }
    }

    /// `GET target` with the default Host, sent to both.
    pub fn get(&self, target: &str) -> Pair {
        self.request(&Req::get(target))
    }

    /// `req` sent to both.
    pub fn request(&self, req: &Req) -> Pair {
        Pair {
            request: req.to_string(),
            edge: req.send(self.edge_port),
            caddy: req.send(self.caddy_port),
        }
    }

    /// `req` sent to both, the raw bytes each answered (for answers that are no HTTP
    /// response, as `abort`'s closed connection).
    pub fn raw(&self, req: &Req) -> (Vec<u8>, Vec<u8>) {
        (req.send_raw(self.edge_port), req.send_raw(self.caddy_port))
    }

    /// The edge's HTTP port, for a test that talks to the edge alone.
    pub fn edge_port(&self) -> u16 {
        self.edge_port
    }

    /// Caddy's HTTP port, for a test that talks to it directly.
    pub fn caddy_port(&self) -> u16 {
        self.caddy_port
    }

    /// The two processes: (edge, caddy).
    pub fn procs(&self) -> (&Proc, &Proc) {
        (&self.edge, &self.caddy)
    }

    /// SIGTERM to both; both must exit cleanly.
    pub fn stop(self) {
        self.edge.stop(WAIT).unwrap();
        self.caddy.stop(WAIT).unwrap();
    }
}

/// Writes `template` with the harness's global options (fresh ports, storage under `state`,
/// `extra` lines) to `file`; returns the HTTP and HTTPS ports.
fn write_config(
    file: &Path,
    template: &str,
    state: &Path,
    extra: &str,
) -> std::io::Result<(u16, u16)> {
    let http = testkit::ports::free_port()?;
    let https = testkit::ports::free_port()?;
    let globals = format!(
        "\tadmin off\n\thttp_port {http}\n\thttps_port {https}\n\tdefault_bind 127.0.0.1\n\tstorage file_system {}\n{extra}",
        state.join("storage").display()
    );
    std::fs::write(file, with_globals(template, &globals))?;
    Ok((http, https))
}

/// `template` with `globals` (option lines) in its global options block, which is made if the
/// template has none. The block is the first thing in the file other than comments: a line
/// holding only `{`.
fn with_globals(template: &str, globals: &str) -> String {
    let mut offset = 0;
    for line in template.split_inclusive('\n') {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            offset += line.len();
            continue;
        }
        if trimmed == "{" {
            let end = offset + line.len();
            return format!("{}{globals}{}", &template[..end], &template[end..]);
        }
        break;
    }
    format!("{{\n{globals}}}\n\n{template}")
}

/// One HTTP/1.1 request, as bytes on the wire.
#[derive(Clone, Debug)]
pub struct Req {
    method: String,
    target: String,
    host: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    chunked: bool,
}

impl Req {
    /// `method target` with the default Host.
    pub fn new(method: &str, target: &str) -> Req {
        Req {
            method: method.to_owned(),
            target: target.to_owned(),
            host: Some(DEFAULT_HOST.to_owned()),
            headers: Vec::new(),
            body: Vec::new(),
            chunked: false,
        }
    }

    /// `GET target` with the default Host.
    pub fn get(target: &str) -> Req {
        Req::new("GET", target)
    }

    /// Sends `host` as the Host header (`None`: no Host header at all).
    pub fn host(mut self, host: Option<&str>) -> Req {
        self.host = host.map(str::to_owned);
        self
    }

    /// Adds a header line.
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sends `body` with its Content-Length.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Req {
        self.body = body.into();
        self
    }

    /// Sends the body chunked (one chunk), so its length is not known in advance.
    pub fn chunked(mut self) -> Req {
        self.chunked = true;
        self
    }

    /// The request's bytes: the head as given, `Connection: close`, and the body.
    fn bytes(&self) -> Vec<u8> {
        let mut head = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        if let Some(host) = &self.host {
            head.push_str(&format!("Host: {host}\r\n"));
        }
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if self.chunked {
            head.push_str("Transfer-Encoding: chunked\r\n");
        } else if !self.body.is_empty() {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        head.push_str("Connection: close\r\n\r\n");
        let mut bytes = head.into_bytes();
        if self.chunked {
            bytes.extend_from_slice(format!("{:x}\r\n", self.body.len()).as_bytes());
            bytes.extend_from_slice(&self.body);
            bytes.extend_from_slice(b"\r\n0\r\n\r\n");
        } else {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }

    /// Sends the request to `127.0.0.1:port` on a new connection; what came back.
    fn send_raw(&self, port: u16) -> Vec<u8> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        // A server that closes at once (abort) may refuse the rest of the request.
        let _ = stream.write_all(&self.bytes());
        let mut raw = Vec::new();
        // A server may close hard right after answering: what arrived is the answer.
        let _ = stream.read_to_end(&mut raw);
        raw
    }

    /// Sends the request to `127.0.0.1:port` on a new connection and reads the response.
    pub fn send(&self, port: u16) -> Reply {
        let raw = self.send_raw(port);
        Reply::parse(&raw, self.method == "HEAD")
            .unwrap_or_else(|why| panic!("{self}: port {port}: {why}: {raw:?}"))
    }
}

impl std::fmt::Display for Req {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.target)?;
        if let Some(host) = &self.host
            && host != DEFAULT_HOST
        {
            write!(f, " (Host: {host})")?;
        }
        for (name, value) in &self.headers {
            write!(f, " ({name}: {value})")?;
        }
        Ok(())
    }
}

/// A response as the client got it (a chunked body already decoded).
#[derive(Clone, Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The header lines in order, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    fn parse(raw: &[u8], head_only: bool) -> Result<Reply, String> {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no end of the response head")?;
        let head = String::from_utf8_lossy(&raw[..end]);
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or("no status line")?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let rest = &raw[end + 4..];
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        let body = if head_only {
            Vec::new()
        } else if chunked {
            dechunk(rest)?
        } else {
            rest.to_vec()
        };
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// The values of header `name`, joined by ", " as HTTP allows; `None` if absent.
    pub fn header(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  {}", self.status)?;
        for (name, value) in &self.headers {
            writeln!(f, "  {name}: {value}")?;
        }
        let text = self.text();
        let shown: String = text.chars().take(2000).collect();
        writeln!(f, "  ---")?;
        for line in shown.lines() {
            writeln!(f, "  {line}")?;
        }
        if shown.len() < text.len() {
            writeln!(f, "  ... ({} bytes in all)", self.body.len())?;
        }
        Ok(())
    }
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk size line never ends")?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("a chunk is cut short".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// What the edge and Caddy answered to one request.
pub struct Pair {
    /// The request, for messages.
    pub request: String,
    /// The edge's answer.
    pub edge: Reply,
    /// Caddy's answer.
    pub caddy: Reply,
}

impl Pair {
    /// Asserts that status, body and each header in `headers` (absent on both counts as the
    /// same) agree; on a mismatch, panics showing both answers in full.
    pub fn assert_same(&self, headers: &[&str]) -> &Pair {
        self.compare(headers, true)
    }

    /// As [`Pair::assert_same`] without the body: for an answer whose body is a known
    /// difference (the edge writes a short text on errors where Caddy writes none), so the
    /// rest is still compared.
    pub fn assert_same_head(&self, headers: &[&str]) -> &Pair {
        self.compare(headers, false)
    }

    fn compare(&self, headers: &[&str], body: bool) -> &Pair {
        let mut differ = Vec::new();
        if self.edge.status != self.caddy.status {
            differ.push("status".to_owned());
        }
        if body && self.edge.body != self.caddy.body {
            differ.push("body".to_owned());
        }
        for name in headers {
            if self.edge.header(name) != self.caddy.header(name) {
                differ.push(format!("header {name}"));
            }
        }
        assert!(
            differ.is_empty(),
            "{}: edge and caddy differ in {}\nedge:\n{}caddy:\n{}",
            self.request,
            differ.join(", "),
            self.edge,
            self.caddy
        );
        self
    }

    /// Asserts that Caddy answered `status`, which shows the test exercises what it means to
    /// (a template Caddy reads differently from the test's intent would pass vacuously).
    pub fn caddy_status(&self, status: u16) -> &Pair {
        assert_eq!(
            self.caddy.status, status,
            "{}: caddy answered\n{}",
            self.request, self.caddy
        );
        self
    }
}

impl Upstreams {
    /// An echo server: the body of every answer is the request as the server saw it, as text:
    /// `METHOD TARGET`, then each header as `name: value` sorted by name, a blank line and the
    /// request body. A differential test then compares what reached the upstream by comparing
    /// bodies.
    ///
    /// One header is left out: `Accept-Encoding: gzip` alone. Caddy's Go transport adds it to
    /// requests that carry none and undoes the compression itself, so no client ever sees it;
    /// the price is that a client's own `Accept-Encoding: gzip` is not compared either.
    pub fn echo(&self) -> SocketAddr {
        self.http_with(|req: &hyper::http::request::Parts, body: &[u8]| {
            let mut headers: Vec<String> = req
                .headers
                .iter()
                .filter(|(n, v)| !(*n == "accept-encoding" && v.as_bytes() == b"gzip"))
                .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v.as_bytes())))
                .collect();
            headers.sort();
            let mut text = format!("{} {}\n", req.method, req.uri);
            for line in headers {
                text.push_str(&line);
                text.push('\n');
            }
            text.push('\n');
            text.push_str(&String::from_utf8_lossy(body));
            text
        })
    }
}
