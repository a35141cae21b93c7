//! `cargo xtask quickstart`: the reference lab on this one machine, on loopback ports.
//!
//! It starts what the lab runs on its two hosts, from the tools' own binaries: the tunnel server
//! and client carrying the lab's four services (`ssh`, `web`, `git`, `gitssh`, each answered by
//! a small demo service here), edge with its internal CA in front of `web` and `git` as the
//! lab's Caddyfile has it, a PostgreSQL cluster where `pgprov apply` makes the lab's five
//! databases, an S3 server that `s3sync` pushes the examples folder to, and one `backupd run`
//! followed by `backupd verify`. Then it prints what runs and commands to try, and on Ctrl-C
//! (or SIGTERM) stops everything and removes its folder. Every child process is also tied to
//! this one with a parent-death signal, so even `kill -9` of the quickstart leaves nothing.
//!
//! PostgreSQL and the S3 server are testkit's (the same parts the tests use): PostgreSQL from
//! the installed server binaries, running as `nobody` under root; S3 from `s3s-fs`.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use rand::RngCore;
use testkit::{PgCluster, Proc, ProcBuilder, S3Server, Scratch};

/// The tools the lab runs, all of which must be in the binary folder.
pub const TOOLS: [&str; 5] = ["tunnel", "edge", "pgprov", "s3sync", "backupd"];

/// How long one part may take to start.
const START: Duration = Duration::from_secs(60);

/// The lab's tunnel services, with what answers each at home.
const SERVICES: [(&str, Demo); 4] = [
    ("ssh", Demo::Banner("SSH-2.0-labkit-quickstart-ssh")),
    (
        "web",
        Demo::Http("the home lab's web service, through the tunnel and edge"),
    ),
    (
        "git",
        Demo::Http("the home lab's git service, through the tunnel and edge"),
    ),
    ("gitssh", Demo::Banner("SSH-2.0-labkit-quickstart-gitssh")),
];

/// Why the quickstart could not bring the lab up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tool's binary is missing.
    #[error("{0} is missing: build the tools first (scripts/quickstart does)")]
    MissingTool(PathBuf),
    /// A part (a process, PostgreSQL, S3) failed.
    #[error("{what}: {source}")]
    Part {
        /// The step.
        what: &'static str,
        /// What failed.
        source: testkit::Error,
    },
    /// A file could not be written or read.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// What the OS said.
        source: io::Error,
    },
    /// A check of the running lab failed.
    #[error("{0}")]
    Check(String),
}

fn part<T>(what: &'static str, result: Result<T, testkit::Error>) -> Result<T, Error> {
    result.map_err(|source| Error::Part { what, source })
}

fn io<T>(what: impl Into<String>, result: io::Result<T>) -> Result<T, Error> {
    result.map_err(|source| Error::Io {
        what: what.into(),
        source,
    })
}

/// What answers a tunnel service at home.
#[derive(Clone, Copy)]
enum Demo {
    /// An HTTP server answering every request with this text.
    Http(&'static str),
    /// A TCP server that sends this line, as an SSH server greets.
    Banner(&'static str),
}

/// Starts a demo service on a free loopback port; it serves until the process ends.
fn start_demo(demo: Demo) -> Result<u16, Error> {
    let listener = io("binding a demo service", TcpListener::bind("127.0.0.1:0"))?;
    let port = io("binding a demo service", listener.local_addr())?.port();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = serve_demo(demo, stream);
            });
        }
    });
    Ok(port)
}

fn serve_demo(demo: Demo, stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    match demo {
        Demo::Banner(line) => writer.write_all(format!("{line}\r\n").as_bytes()),
        Demo::Http(text) => {
            // One response per connection: read the request head (bounded), answer, close.
            let mut reader = BufReader::new(stream).take(64 * 1024);
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                    break;
                }
            }
            let body = format!("{text}\n");
            write!(
                writer,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        }
    }
}

/// A free loopback port (see testkit::ports on why a clash is possible and rare).
fn port() -> Result<u16, Error> {
    io("finding a free port", testkit::ports::free_port())
}

fn token() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Writes a new file readable only by its owner. The file is created with that mode, so its
/// secret is never readable by others, not even between a write and a chmod; a file already at
/// the path is refused, since whoever put it there may hold it open.
fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    let what = format!("writing {}", path.display());
    let mut file = io(
        &what,
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path),
    )?;
    io(&what, file.write_all(text.as_bytes()))
}

/// Waits until `check` passes; the lab's parts report readiness, but a tunnel service is only
/// reachable once the client's control channel for it is up, which nothing announces.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) -> Result<(), Error> {
    let deadline = Instant::now() + START;
    while !check() {
        if Instant::now() > deadline {
            return Err(Error::Check(format!(
                "{what} did not happen within {START:?}"
            )));
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether a TCP connection to the port gets `expected` in its first bytes.
fn answers(port: u16, request: &[u8], expected: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream.write_all(request).is_err() {
        return false;
    }
    let mut got = Vec::new();
    let _ = stream.take(64 * 1024).read_to_end(&mut got);
    String::from_utf8_lossy(&got).contains(expected)
}

/// One tool run to completion with an environment; its stdout.
fn run_tool(bin: &Path, args: &[&str], env: &[(String, String)]) -> Result<String, Error> {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let env: Vec<(std::ffi::OsString, std::ffi::OsString)> =
        env.iter().map(|(k, v)| (k.into(), v.into())).collect();
    part("running a tool", testkit::proc::run(bin, &args, &env))
}

fn os_env(env: Vec<(std::ffi::OsString, std::ffi::OsString)>) -> Vec<(String, String)> {
    env.into_iter()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// A shell word: the argument as `sh` reads it back.
fn quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=@".contains(&b))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The running lab. Dropping it stops every part.
pub struct Lab {
    /// Commands to try, each a shell line that exits 0 while the lab runs.
    pub commands: Vec<(String, String)>,
    /// What runs where, a line each.
    pub running: Vec<String>,
    procs: Vec<(String, Proc)>,
    pg: Option<PgCluster>,
    s3: Option<S3Server>,
    dir: Scratch,
}

impl Lab {
    /// The lab's folder: configs, credentials, the CA root, edge's storage.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the daemons with SIGTERM (each drains and exits), then PostgreSQL and S3. A part
    /// that already left (Ctrl-C in a terminal signals the whole process group) is fine; one
    /// that does not stop in time is killed.
    pub fn stop(mut self) {
        while let Some((_, proc)) = self.procs.pop() {
            let _ = proc.stop(START);
        }
        if let Some(mut pg) = self.pg.take() {
            let _ = pg.stop();
        }
        drop(self.s3.take());
    }
}

fn say(log: &mut dyn Write, line: &str) {
    let _ = writeln!(log, "quickstart: {line}");
}

/// Brings the lab up with the tools in `bin_dir`, reporting each step on `log`.
pub fn start(root: &Path, bin_dir: &Path, log: &mut dyn Write) -> Result<Lab, Error> {
    for tool in TOOLS {
        let path = bin_dir.join(tool);
        if !path.is_file() {
            return Err(Error::MissingTool(path));
        }
    }
    let bin = |tool: &str| bin_dir.join(tool);
    let dir = io("making the lab's folder", Scratch::new("quickstart"))?;
    let mut lab = Lab {
        commands: Vec::new(),
        running: Vec::new(),
        procs: Vec::new(),
        pg: None,
        s3: None,
        dir,
    };
    let folder = lab.dir.path().to_path_buf();
    let path = |name: &str| folder.join(name);

    // Home: the demo services behind the tunnel.
    let mut home = Vec::new();
    for (name, demo) in SERVICES {
        home.push((name, start_demo(demo)?));
    }

    // The public VM: the tunnel server, each service on a loopback port.
    say(
        log,
        "starting the tunnel server and client with the lab's four services",
    );
    let control = port()?;
    let mut server = format!(
        "# The lab's tunnel server (examples/tunnel/server.toml), on loopback ports.\n[server]\nbind_addr = \"127.0.0.1:{control}\"\n"
    );
    let mut client =
        format!("# The lab's tunnel client.\n[client]\nremote_addr = \"127.0.0.1:{control}\"\n");
    let mut public = Vec::new();
    for (name, local) in &home {
        let visitor = port()?;
        let token = token();
        let _ = write!(
            server,
            "\n[server.services.{name}]\ntoken = \"{token}\"\nbind_addr = \"127.0.0.1:{visitor}\"\n"
        );
        let _ = write!(
            client,
            "\n[client.services.{name}]\ntoken = \"{token}\"\nlocal_addr = \"127.0.0.1:{local}\"\n"
        );
        public.push((*name, visitor));
    }
    let server_toml = path("tunnel-server.toml");
    let client_toml = path("tunnel-client.toml");
    write_private(&server_toml, &server)?;
    write_private(&client_toml, &client)?;
    lab.spawn(
        "tunnel server",
        ProcBuilder::new(bin("tunnel"))
            .args(["server", "-c"])
            .arg(&server_toml),
    )?;
    lab.spawn(
        "tunnel client",
        ProcBuilder::new(bin("tunnel"))
            .args(["client", "-c"])
            .arg(&client_toml),
    )?;
    for (name, visitor) in &public {
        let (request, expected): (&[u8], &str) = match SERVICES.iter().find(|s| s.0 == *name) {
            Some((_, Demo::Banner(line))) => (b"", line),
            Some((_, Demo::Http(text))) => (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", text),
            None => unreachable!("public ports come from SERVICES"),
        };
        wait_until(&format!("the tunnel carrying {name}"), || {
            answers(*visitor, request, expected)
        })?;
        lab.running.push(format!(
            "tunnel service {name:<7} 127.0.0.1:{visitor} -> home 127.0.0.1:{}",
            home.iter().find(|h| h.0 == *name).map_or(0, |h| h.1)
        ));
    }
    let web = public.iter().find(|p| p.0 == "web").map_or(0, |p| p.1);
    let git = public.iter().find(|p| p.0 == "git").map_or(0, |p| p.1);

    // The edge in front of web and git, with the lab's Caddyfile and the internal CA.
    say(
        log,
        "starting edge with its internal CA in front of web and git",
    );
    // Loopback only, where the free ports were found; a port taken between the check and the
    // bind (another program's, rarely) is retried with new ones.
    let storage = path("edge");
    let caddyfile = path("Caddyfile");
    let mut attempt = 0;
    let (http, https) = loop {
        let (http, https) = (port()?, port()?);
        write_private(
            &caddyfile,
            &format!(
                "# The lab's Caddyfile (examples/edge/Caddyfile) with `tls internal` and loopback ports.\n{{\n\thttp_port {http}\n\thttps_port {https}\n\tdefault_bind 127.0.0.1\n\tstorage file_system {}\n}}\n\nlab.example.org {{\n\ttls internal\n\treverse_proxy localhost:{web}\n}}\n\ngit.example.org {{\n\ttls internal\n\treverse_proxy localhost:{git}\n}}\n",
                storage.display()
            ),
        )?;
        let started = lab.spawn(
            "edge",
            ProcBuilder::new(bin("edge"))
                .args(["run", "--caddyfile"])
                .arg(&caddyfile),
        );
        match started {
            Ok(()) => break (http, https),
            Err(err) if attempt < 4 && err.to_string().contains("ddress already in use") => {
                attempt += 1;
                io("removing the Caddyfile", fs::remove_file(&caddyfile))?;
            }
            Err(err) => return Err(err),
        }
    };
    let root_pem = path("root.pem");
    let pem = run_tool(
        &bin("edge"),
        &["ca", "root", "--caddyfile", &caddyfile.to_string_lossy()],
        &[],
    )?;
    io("writing the CA root", fs::write(&root_pem, pem))?;
    lab.running.push(format!(
        "edge                   https://lab.example.org:{https} and https://git.example.org:{https} (127.0.0.1), http on :{http}"
    ));

    // PostgreSQL and pgprov.
    say(
        log,
        "starting PostgreSQL; pgprov apply makes the lab's five databases",
    );
    let pg = part("starting PostgreSQL", PgCluster::start())?;
    let pg_env = os_env(pg.env());
    let lab_toml = path("lab.toml");
    let example = io(
        "reading examples/pgprov/lab.toml",
        fs::read_to_string(root.join("examples/pgprov/lab.toml")),
    )?;
    let example = example.replace("host = \"172.17.0.1\"", "host = \"127.0.0.1\"");
    io("writing lab.toml", fs::write(&lab_toml, example))?;
    let credentials = path("db");
    let applied = run_tool(
        &bin("pgprov"),
        &[
            "apply",
            &lab_toml.to_string_lossy(),
            "--format",
            "uri",
            "--out-dir",
            &credentials.to_string_lossy(),
        ],
        &pg_env,
    )?;
    let _ = write!(log, "{applied}");
    lab.running.push(format!(
        "postgresql             127.0.0.1:{} (socket in {}), credentials in {}",
        pg.port(),
        pg.socket_dir().display(),
        credentials.display()
    ));
    let psql = pg.bin("psql");

    // S3, s3sync and backupd.
    say(
        log,
        "starting an S3 server; s3sync pushes examples/ to s3://lab/examples/",
    );
    let s3 = part("starting the S3 server", S3Server::start())?;
    let s3_env = os_env(s3.env());
    let s3_file = path("s3.env");
    write_private(
        &s3_file,
        &s3_env
            .iter()
            .map(|(k, v)| format!("{k}={}\n", quote(v)))
            .collect::<String>(),
    )?;
    run_tool(&bin("s3sync"), &["mb", "s3://lab"], &s3_env)?;
    let pushed = run_tool(
        &bin("s3sync"),
        &[
            "sync",
            &root.join("examples").to_string_lossy(),
            "s3://lab/examples/",
        ],
        &s3_env,
    )?;
    let _ = write!(log, "{pushed}");
    lab.running.push(format!(
        "s3                     {} (bucket lab; credentials in {})",
        s3.endpoint(),
        s3_file.display()
    ));

    say(
        log,
        "backupd run, then backupd verify (encrypted with a fresh age key)",
    );
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let key = path("backup.key");
    {
        use age::secrecy::ExposeSecret;
        write_private(&key, &format!("{}\n", identity.to_string().expose_secret()))?;
    }
    // backupd signs every manifest; restore and verify trust this key.
    let signing_key = path("backupd.sign");
    run_tool(
        &bin("backupd"),
        &["keygen", "-o", &signing_key.to_string_lossy()],
        &[],
    )?;
    let backupd_toml = path("backupd.toml");
    write_private(
        &backupd_toml,
        &format!(
            "# One backup of the lab's databases and its examples folder to S3, encrypted.\n\
             [[source]]\nname = \"lab\"\ntype = \"postgres\"\ndatabases = [\"ci\", \"dw\", \"gitea\", \"jupyterhub\", \"metabase\"]\n\n\
             [[source]]\nname = \"examples\"\ntype = \"folder\"\npath = {:?}\n\n\
             [[target]]\nname = \"s3\"\nurl = \"s3://lab/backups\"\n\n\
             [encryption]\nrecipients = [\"{recipient}\"]\nidentity_file = \"backup.key\"\n\n\
             [signing]\nkey_file = \"backupd.sign\"\n\n\
             [postgres]\nbin_dir = {:?}\n\n\
             [retention]\nkeep_last = 3\n",
            root.join("examples").display().to_string(),
            pg.bin_dir().display().to_string(),
        ),
    )?;
    let backup_env: Vec<(String, String)> = pg_env.iter().chain(&s3_env).cloned().collect();
    let ids = run_tool(
        &bin("backupd"),
        &["run", "-c", &backupd_toml.to_string_lossy()],
        &backup_env,
    )?;
    let _ = write!(log, "{ids}");
    let verified = run_tool(
        &bin("backupd"),
        &["verify", "--latest", "-c", &backupd_toml.to_string_lossy()],
        &backup_env,
    )?;
    let _ = write!(log, "{verified}");

    // What to try. Each line runs in sh; the test runs every one.
    let env_prefix = |file: &Path| format!("env $(cat {})", quote(&file.to_string_lossy()));
    let backup_prefix = format!(
        "env $(cat {}) PGHOST={} PGPORT={} PGUSER={}",
        quote(&s3_file.to_string_lossy()),
        quote(&pg.socket_dir().to_string_lossy()),
        pg.port(),
        pg.superuser()
    );
    let q = |p: &Path| quote(&p.to_string_lossy());
    lab.commands = vec![
        (
            "the web service through edge and the tunnel".into(),
            format!(
                "curl --fail --silent --cacert {} --resolve lab.example.org:{https}:127.0.0.1 https://lab.example.org:{https}/",
                q(&root_pem)
            ),
        ),
        (
            "the git service over HTTP/2".into(),
            format!(
                "curl --fail --silent --http2 --cacert {} --resolve git.example.org:{https}:127.0.0.1 https://git.example.org:{https}/",
                q(&root_pem)
            ),
        ),
        (
            "Metabase's database, with the URI pgprov wrote".into(),
            format!(
                "{} \"$(cat {})\" -c 'select current_user, current_database()'",
                q(&psql),
                q(&credentials.join("metabase.uri"))
            ),
        ),
        (
            "the databases pgprov made".into(),
            format!(
                "env PGHOST={} PGPORT={} PGUSER={} {} list",
                q(pg.socket_dir()),
                pg.port(),
                pg.superuser(),
                q(&bin("pgprov"))
            ),
        ),
        (
            "the folder s3sync pushed".into(),
            format!(
                "{} {} ls s3://lab/examples/",
                env_prefix(&s3_file),
                q(&bin("s3sync"))
            ),
        ),
        (
            "the backups backupd made and verified".into(),
            format!(
                "{backup_prefix} {} list -c {}",
                q(&bin("backupd")),
                q(&backupd_toml)
            ),
        ),
    ];
    lab.pg = Some(pg);
    lab.s3 = Some(s3);
    Ok(lab)
}

impl Lab {
    /// Starts a daemon that reports READY=1 and keeps it until the lab stops.
    fn spawn(&mut self, name: &str, builder: ProcBuilder) -> Result<(), Error> {
        let proc = part("starting a daemon", builder.notify().spawn())?;
        part("waiting for READY=1", proc.wait_ready(START))?;
        self.procs.push((name.to_owned(), proc));
        Ok(())
    }
}

/// The quickstart's report once the lab is up.
pub fn summary(lab: &Lab) -> String {
    let mut out = String::from("\nThe lab is up (its folder: ");
    let _ = writeln!(out, "{}):", lab.dir().display());
    for line in &lab.running {
        let _ = writeln!(out, "  {line}");
    }
    out.push_str("\nTry:\n");
    for (what, command) in &lab.commands {
        let _ = writeln!(out, "  # {what}\n  $ {command}");
    }
    out.push_str("\nCtrl-C stops the lab and removes its folder.\n");
    out
}

/// SIGINT and SIGTERM, caught from the moment this returns (so a Ctrl-C during start-up stops
/// the lab once it is up rather than killing the quickstart and leaving its parts behind).
/// Handlers, not a blocked mask: children inherit a mask, and would then ignore SIGTERM.
pub struct StopSignals {
    runtime: tokio::runtime::Runtime,
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Installs the handlers.
    pub fn install() -> Result<StopSignals, Error> {
        use tokio::signal::unix::{SignalKind, signal};
        let runtime = io(
            "starting the signal runtime",
            tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build(),
        )?;
        let (interrupt, terminate) = runtime.block_on(async {
            (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            )
        });
        Ok(StopSignals {
            runtime,
            interrupt: io("catching SIGINT", interrupt)?,
            terminate: io("catching SIGTERM", terminate)?,
        })
    }

    /// Waits for one of them; returns its name.
    pub fn wait(&mut self) -> &'static str {
        let (interrupt, terminate) = (&mut self.interrupt, &mut self.terminate);
        self.runtime.block_on(async {
            tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn private_files_are_created_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_private(&path, "secret").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read_to_string(&path).unwrap(), "secret");
    }

    #[test]
    fn a_secret_never_lands_in_a_file_someone_else_holds_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        // Someone made the file first, readable by all, and keeps it open.
        fs::write(&path, "").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let mut planted = fs::File::open(&path).unwrap();

        assert!(write_private(&path, "secret").is_err());
        let mut seen = String::new();
        planted.read_to_string(&mut seen).unwrap();
        assert_eq!(seen, "");
    }
}
