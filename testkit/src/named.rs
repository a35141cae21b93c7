//! A real authoritative DNS server per test: Debian's BIND 9 `named`, primary for one zone
//! that a TSIG key may update (RFC 2136, `allow-update { key ...; }`), on 127.0.0.1 and a
//! free port, UDP and TCP.
//!
//! `named` cannot bind port 0 and report the port, so the port is found free, released and
//! given to it ([`crate::ports`]); BIND logs a taken port and serves on without it, so
//! readiness is a query answered (by `dig`) on that port, and a clash starts again on
//! another. The TSIG secret is random per server; [`Named::txt`] and [`Named::update`] give a
//! test `dig`'s and `nsupdate`'s view of the zone, independent of the code under test.
//! Records have TTL 0 (negative answers too), so no resolver keeps an answer a test changed.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::proc::{Proc, ProcBuilder, run, which};
use crate::scratch::Scratch;
use crate::{Error, ports};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The zone and key a [`Named`] is started with.
#[derive(Clone, Debug)]
pub struct NamedBuilder {
    zone: String,
    key_name: String,
    algorithm: String,
    records: String,
}

impl Default for NamedBuilder {
    fn default() -> NamedBuilder {
        NamedBuilder {
            zone: "test.example".into(),
            key_name: "edge-key".into(),
            algorithm: "hmac-sha256".into(),
            records: String::new(),
        }
    }
}

impl NamedBuilder {
    /// The zone served (default `test.example`).
    pub fn zone(mut self, zone: &str) -> NamedBuilder {
        self.zone = zone.trim_end_matches('.').to_owned();
        self
    }

    /// Zone file lines added below the SOA and NS records, relative to the zone's origin
    /// (`app IN A 127.0.0.2`).
    pub fn records(mut self, records: &str) -> NamedBuilder {
        self.records = records.to_owned();
        self
    }

    /// The TSIG algorithm of the update key (default `hmac-sha256`).
    pub fn algorithm(mut self, algorithm: &str) -> NamedBuilder {
        self.algorithm = algorithm.to_owned();
        self
    }

    /// Starts `named` and waits until it answers for the zone.
    pub fn start(self) -> Result<Named, Error> {
        let named = which("named")
            .or_else(|| Some(PathBuf::from("/usr/sbin/named")).filter(|p| p.exists()))
            .ok_or_else(|| Error::Missing("named not found: apt-get install bind9".into()))?;
        let dig = which("dig").ok_or_else(|| {
            Error::Missing("dig not found: apt-get install bind9-dnsutils".into())
        })?;
        let secret = {
            let bytes: [u8; 32] = rand::random();
            base64(&bytes)
        };
        let scratch = Scratch::new("named")?;
        let dir = scratch.path().to_owned();
        let zone_file = scratch.join(format!("{}.zone", self.zone));
        fs::write(
            &zone_file,
            format!(
                "$ORIGIN {zone}.\n$TTL 0\n@ IN SOA ns1.{zone}. hostmaster.{zone}. 1 60 60 3600 0\n\
                 @ IN NS ns1.{zone}.\nns1 IN A 127.0.0.1\n{records}\n",
                zone = self.zone,
                records = self.records,
            ),
        )?;
        let proc = ports::retry_on_port_clash(|_| {
            let port = ports::free_port()?;
            let config = scratch.join("named.conf");
            fs::write(
                &config,
                format!(
                    "options {{\n directory \"{dir}\";\n pid-file \"{dir}/named.pid\";\n \
                     session-keyfile \"{dir}/session.key\";\n listen-on port {port} {{ 127.0.0.1; }};\n \
                     listen-on-v6 {{ none; }};\n recursion no;\n notify no;\n dnssec-validation no;\n}};\n\
                     controls {{ }};\n\
                     key \"{key}.\" {{ algorithm {alg}; secret \"{secret}\"; }};\n\
                     zone \"{zone}\" {{\n type primary;\n file \"{file}\";\n \
                     allow-update {{ key \"{key}.\"; }};\n}};\n",
                    dir = dir.display(),
                    key = self.key_name,
                    alg = self.algorithm,
                    zone = self.zone,
                    file = zone_file.display(),
                ),
            )?;
            let _ = fs::remove_file(scratch.join(format!("{}.zone.jnl", self.zone)));
            // One worker thread, IPv4 only: a test zone needs no more.
            let mut builder = ProcBuilder::new(&named).args(["-g", "-4", "-n", "1"]);
            if nix::unistd::Uid::effective().is_root() {
                // Else named drops to Debian's `bind` user, who cannot read the scratch folder.
                builder = builder.args(["-u", "root"]);
            }
            let proc = builder.arg("-c").arg(&config).spawn()?;
            proc.wait_output("all zones loaded", START_TIMEOUT)?;
            if proc.stderr().contains("interface ignored") {
                // BIND serves on without a port it could not bind: a clash.
                return Err(Error::Setup(format!("named could not bind port {port}")));
            }
            answering(&dig, port, &self.zone)?;
            Ok((proc, port))
        })?;
        let (proc, port) = proc;
        Ok(Named {
            proc,
            port,
            dig,
            zone: self.zone,
            key_name: self.key_name,
            algorithm: self.algorithm,
            secret,
            _scratch: scratch,
        })
    }
}

/// Waits until `dig` gets the zone's SOA from port `port`; each try is a real query with its
/// own timeout, so a server not ready yet costs one try, never a sleep.
fn answering(dig: &std::path::Path, port: u16, zone: &str) -> Result<(), Error> {
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    let mut pause = Duration::from_millis(5);
    loop {
        let out = std::process::Command::new(dig)
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "+short",
                "+time=1",
                "+tries=1",
            ])
            .args([zone, "SOA"])
            .output()?;
        if out.status.success() && !out.stdout.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Setup(format!(
                "named on port {port} does not answer for {zone}: {}",
                String::from_utf8_lossy(&out.stdout)
            )));
        }
        // A refused query returns at once: back off as ports::wait_listening does.
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Standard base64 with padding, as BIND writes TSIG secrets.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= n {
                out.push(char::from(ALPHABET[((v >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A running `named`, stopped on drop.
#[derive(Debug)]
pub struct Named {
    proc: Proc,
    port: u16,
    dig: PathBuf,
    zone: String,
    key_name: String,
    algorithm: String,
    secret: String,
    _scratch: Scratch,
}

impl Named {
    /// A server for `test.example` with an hmac-sha256 update key.
    pub fn builder() -> NamedBuilder {
        NamedBuilder::default()
    }

    /// Where it listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The zone it serves.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// The update key's name (without the final dot).
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// The update key's algorithm ("hmac-sha256").
    pub fn key_alg(&self) -> &str {
        &self.algorithm
    }

    /// The update key's secret, base64.
    pub fn key_secret(&self) -> &str {
        &self.secret
    }

    /// `dig +short` of `name` ("app.test.example") and `kind` ("A", "SRV") at this server.
    pub fn dig(&self, name: &str, kind: &str) -> Result<String, Error> {
        let port = self.port.to_string();
        let args = [
            "@127.0.0.1",
            "-p",
            &port,
            "+short",
            "+time=2",
            "+tries=2",
            name,
            kind,
        ];
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        run(&self.dig, &args, &[])
    }

    /// The TXT values of `name` as `dig` sees them on this server (quotes removed).
    pub fn txt(&self, name: &str) -> Result<Vec<String>, Error> {
        Ok(self
            .dig(name, "TXT")?
            .lines()
            .map(|l| l.trim().trim_matches('"').to_owned())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// Runs `nsupdate` with the update key on `commands` (lines such as `update add NAME 60
    /// TXT "v"`), for a test that plants records of its own. The key goes through stdin.
    pub fn update(&self, commands: &str) -> Result<(), Error> {
        let nsupdate = which("nsupdate").ok_or_else(|| {
            Error::Missing("nsupdate not found: apt-get install bind9-dnsutils".into())
        })?;
        let script = format!(
            "server 127.0.0.1 {}\nkey {}:{}. {}\nzone {}\n{commands}\nsend\n",
            self.port, self.algorithm, self.key_name, self.secret, self.zone
        );
        let proc = ProcBuilder::new(nsupdate).stdin(script).spawn()?;
        proc.expect_exit(0, START_TIMEOUT)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.proc.stderr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_with_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
