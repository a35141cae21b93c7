//! BIND (`named`, Debian's bind9) as an authoritative DNS server for tests: one zone, read
//! from a file in a scratch folder, served on 127.0.0.1 at a free port, run in the foreground
//! as a child of the test.
//!
//! Invariants: records have TTL 0 unless the caller writes another, so no resolver keeps an
//! answer the test has changed; the zone accepts dynamic updates (`nsupdate`) from loopback
//! only; [`Named::start`] returns once `dig` gets the zone's SOA, never after a sleep; named
//! writes nothing outside its folder (no pid file, session key or control channel).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::proc::{Proc, ProcBuilder};
use crate::scratch::Scratch;
use crate::{Error, ports};

/// Where Debian installs named.
pub const NAMED: &str = "/usr/sbin/named";
/// Where Debian installs dig and nsupdate (bind9-dnsutils).
pub const DIG: &str = "/usr/bin/dig";
/// See [`DIG`].
pub const NSUPDATE: &str = "/usr/bin/nsupdate";

/// A running named serving one zone; stopped on drop.
pub struct Named {
    proc: Proc,
    /// Its port on 127.0.0.1 (UDP and TCP).
    pub port: u16,
    /// The zone's name, without the final dot ("test").
    pub zone: String,
    /// Holds the zone file and named's config and journal.
    _dir: Scratch,
}

impl Named {
    /// Starts named serving `zone` with `records` (zone file lines relative to the zone's
    /// origin, such as `app IN A 127.0.0.2`) below its SOA and NS records.
    pub fn start(zone: &str, records: &str) -> Result<Named, Error> {
        let dir = Scratch::new("named")?;
        let zone_file = dir.join("zone.db");
        std::fs::write(
            &zone_file,
            format!(
                "$ORIGIN {zone}.\n$TTL 0\n\
                 @ IN SOA ns admin 1 3600 600 86400 0\n@ IN NS ns\nns IN A 127.0.0.1\n{records}\n"
            ),
        )?;
        ports::retry_on_port_clash(|attempt| {
            let port = ports::free_port()?;
            let conf = dir.join(format!("named-{attempt}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "options {{\n\tdirectory \"{dir}\";\n\tlisten-on port {port} {{ 127.0.0.1; }};\n\
                     \tlisten-on-v6 {{ none; }};\n\tpid-file none;\n\tsession-keyfile none;\n\
                     \trecursion no;\n\tdnssec-validation no;\n\tnotify no;\n}};\n\
                     controls {{ }};\n\
                     zone \"{zone}\" {{ type primary; file \"{file}\"; allow-update {{ 127.0.0.1; }}; }};\n",
                    dir = dir.path().display(),
                    file = zone_file.display(),
                ),
            )?;
            let proc = ProcBuilder::new(NAMED)
                .args(["-g", "-4", "-n", "1", "-c"])
                .arg(&conf)
                .spawn()?;
            wait_answering(&proc, port, zone, Duration::from_secs(30))?;
            Ok((proc, port))
        })
        .map(|(proc, port)| Named {
            proc,
            port,
            zone: zone.to_owned(),
            _dir: dir,
        })
    }

    /// The server's address, as resolvers are configured with it.
    pub fn addr(&self) -> std::net::SocketAddr {
        (std::net::Ipv4Addr::LOCALHOST, self.port).into()
    }

    /// `dig +short` of `name` ("app.test") and `kind` ("A", "SRV") at this server.
    pub fn dig(&self, name: &str, kind: &str) -> Result<String, Error> {
        dig(self.port, name, kind)
    }

    /// Sends `commands` (nsupdate lines such as `update delete app.test A`) to the zone as
    /// one dynamic update; returns once named has applied it.
    pub fn update(&self, commands: &str) -> Result<(), Error> {
        let script = format!(
            "server 127.0.0.1 {}\nzone {}\n{commands}\nsend\n",
            self.port, self.zone
        );
        let mut child = Command::new(NSUPDATE)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                program: PathBuf::from(NSUPDATE),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes())?;
        }
        let output = child.wait_with_output()?;
        if output.status.success() {
            Ok(())
        } else {
            Err(Error::Setup(format!(
                "nsupdate exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )))
        }
    }

    /// named's output so far, for a failing test's message.
    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }
}

/// `dig +short` of `name` and `kind` at 127.0.0.1:`port`, one try of one second.
fn dig(port: u16, name: &str, kind: &str) -> Result<String, Error> {
    let port = port.to_string();
    let args: Vec<&std::ffi::OsStr> = [
        "@127.0.0.1",
        "-p",
        &port,
        name,
        kind,
        "+short",
        "+time=1",
        "+tries=1",
    ]
    .into_iter()
    .map(std::ffi::OsStr::new)
    .collect();
    crate::proc::run(DIG, &args, &[])
}

/// Waits until named (`proc`) answers `zone`'s SOA on `port`, backing off from 5 ms; each
/// failed query proves it is not serving yet. A named that exited fails at once with its
/// output.
fn wait_answering(proc: &Proc, port: u16, zone: &str, timeout: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    let failed = |what: String| Error::Process {
        name: "named".into(),
        pid: proc.pid(),
        what,
        stdout: proc.stdout(),
        stderr: proc.stderr(),
    };
    loop {
        if let Ok(answer) = dig(port, zone, "SOA")
            && !answer.trim().is_empty()
        {
            return Ok(());
        }
        if proc.stderr().contains("address in use") {
            // Another process took the port after it was found free: try another.
            return Err(Error::Setup(format!("named could not bind port {port}")));
        }
        if let Some(status) = proc.try_status() {
            return Err(failed(format!("exited with {status} before answering")));
        }
        if Instant::now() + pause >= deadline {
            return Err(failed(format!("did not answer within {timeout:?}")));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}
