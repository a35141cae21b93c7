//! A real ACME CA per test: Debian's `pebble` with `pebble-challtestsrv` as its DNS server.
//!
//! The DNS server answers every name with 127.0.0.1, so Pebble validates challenges against
//! the edge under test on loopback, on the HTTP-01 and TLS-ALPN-01 ports the test names.
//! Pebble's API needs a TLS certificate: testkit makes a throwaway CA with rcgen and signs one
//! for `localhost`/`127.0.0.1`; [`Pebble::api_ca_pem`] is what an ACME client must trust to
//! talk to the API. Certificates Pebble issues chain to a different root, which it generates
//! at start and serves on its management port ([`Pebble::issuing_root_pem`]).

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::proc::{Proc, ProcBuilder, which};
use crate::scratch::Scratch;
use crate::{Error, http, ports};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Ports Pebble validates challenges on: those the edge under test listens on.
#[derive(Clone, Copy, Debug)]
pub struct PebbleBuilder {
    http_port: u16,
    tls_port: u16,
    cert_validity: Option<Duration>,
    dns_server: Option<SocketAddr>,
    eab_keys: Option<&'static [(&'static str, &'static str)]>,
}

impl Default for PebbleBuilder {
    fn default() -> PebbleBuilder {
        PebbleBuilder {
            http_port: 5002,
            tls_port: 5001,
            cert_validity: None,
            dns_server: None,
            eab_keys: None,
        }
    }
}

impl PebbleBuilder {
    /// The port HTTP-01 challenges are fetched from.
    pub fn http_port(mut self, port: u16) -> PebbleBuilder {
        self.http_port = port;
        self
    }

    /// The port TLS-ALPN-01 challenges are checked on.
    pub fn tls_port(mut self, port: u16) -> PebbleBuilder {
        self.tls_port = port;
        self
    }

    /// How long issued certificates are valid (Pebble's default is five years); short ones
    /// let a test see renewals.
    pub fn cert_validity(mut self, validity: Duration) -> PebbleBuilder {
        self.cert_validity = Some(validity);
        self
    }

    /// Resolves names (and DNS-01 TXT records) with this server instead of the DNS test
    /// server, e.g. a [`crate::Named`] holding the zone.
    pub fn dns_server(mut self, server: SocketAddr) -> PebbleBuilder {
        self.dns_server = Some(server);
        self
    }

    /// Requires external account binding: new accounts must be bound to one of these
    /// (key id, base64url MAC key) pairs, as ZeroSSL requires.
    pub fn eab_keys(mut self, keys: &'static [(&'static str, &'static str)]) -> PebbleBuilder {
        self.eab_keys = Some(keys);
        self
    }

    /// Starts the DNS server and the CA.
    pub fn start(self) -> Result<Pebble, Error> {
        let pebble_bin = which("pebble")
            .ok_or_else(|| Error::Missing("pebble not found: apt-get install pebble".into()))?;
        let challtest_bin = which("pebble-challtestsrv").ok_or_else(|| {
            Error::Missing("pebble-challtestsrv not found: apt-get install pebble".into())
        })?;
        let scratch = Scratch::new("pebble")?;
        let api_ca_pem = write_listener_certificate(&scratch)?;
        ports::retry_on_port_clash(|_| {
            let dns_port = ports::free_port()?;
            let dns_mgmt_port = ports::free_port()?;
            let challtestsrv = ProcBuilder::new(&challtest_bin)
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-management", &format!("127.0.0.1:{dns_mgmt_port}")])
                .spawn()?;
            challtestsrv.wait_output("Starting management server", START_TIMEOUT)?;
            ports::wait_listening(([127, 0, 0, 1], dns_mgmt_port).into(), START_TIMEOUT)?;

            let api_port = ports::free_port()?;
            let mgmt_port = ports::free_port()?;
            let mut config = serde_json::json!({
                "pebble": {
                    "listenAddress": format!("127.0.0.1:{api_port}"),
                    "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
                    "certificate": scratch.join("api-cert.pem"),
                    "privateKey": scratch.join("api-key.pem"),
                    "httpPort": self.http_port,
                    "tlsPort": self.tls_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": false
                }
            });
            if let Some(keys) = self.eab_keys {
                config["pebble"]["externalAccountBindingRequired"] = true.into();
                let map: serde_json::Map<String, serde_json::Value> = keys
                    .iter()
                    .map(|(id, key)| ((*id).to_owned(), (*key).into()))
                    .collect();
                config["pebble"]["externalAccountMACKeys"] = map.into();
            }
            if let Some(validity) = self.cert_validity {
                config["pebble"]["certificateValidityPeriod"] = validity.as_secs().into();
            }
            let config_path = scratch.join("pebble.json");
            fs::write(&config_path, config.to_string())?;
            let dns_server = self
                .dns_server
                .map_or_else(|| format!("127.0.0.1:{dns_port}"), |s| s.to_string());
            let pebble = ProcBuilder::new(&pebble_bin)
                .args(["-config".as_ref(), config_path.as_os_str()])
                .args(["-dnsserver", &dns_server])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .spawn()?;
            pebble.wait_output("ACME directory available at", START_TIMEOUT)?;
            listening(&pebble, api_port)?;
            listening(&pebble, mgmt_port)?;
            Ok(Pebble {
                pebble: Some(pebble),
                challtestsrv,
                api_port,
                mgmt_port,
                dns_mgmt_port,
                api_ca_pem: api_ca_pem.clone(),
                api_ca_path: scratch.join("api-ca.pem"),
                pebble_bin: pebble_bin.clone(),
                dns_port,
                dns_server,
                config_path,
                scratch: None,
            })
        })
        .map(|mut pebble| {
            pebble.scratch = Some(scratch);
            pebble
        })
    }
}

/// Waits for Pebble to listen on `port`; Pebble logs its addresses before it binds them, and
/// a port taken meanwhile shows only in its log, which the error then carries.
fn listening(pebble: &Proc, port: u16) -> Result<(), Error> {
    ports::wait_listening(([127, 0, 0, 1], port).into(), START_TIMEOUT)
        .map_err(|err| Error::Setup(format!("{err}\npebble's log:\n{}", pebble.stderr())))
}

fn write_listener_certificate(scratch: &Scratch) -> Result<String, Error> {
    let setup = |e: rcgen::Error| Error::Setup(format!("making Pebble's API certificate: {e}"));
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(setup)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "testkit Pebble API CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(setup)?)
        .map_err(setup)?;
    let key = KeyPair::generate().map_err(setup)?;
    let names = vec![
        "localhost".to_owned(),
        "pebble".to_owned(),
        "127.0.0.1".to_owned(),
    ];
    let cert = CertificateParams::new(names)
        .map_err(setup)?
        .signed_by(&key, &ca)
        .map_err(setup)?;
    fs::write(scratch.join("api-cert.pem"), cert.pem())?;
    fs::write(scratch.join("api-key.pem"), key.serialize_pem())?;
    fs::write(scratch.join("api-ca.pem"), ca.pem())?;
    Ok(ca.pem())
}

/// A running Pebble, stopped on drop.
#[derive(Debug)]
pub struct Pebble {
    pebble: Option<Proc>,
    challtestsrv: Proc,
    api_port: u16,
    mgmt_port: u16,
    dns_mgmt_port: u16,
    api_ca_pem: String,
    api_ca_path: PathBuf,
    pebble_bin: PathBuf,
    dns_port: u16,
    /// What Pebble resolves with: the DNS test server or the builder's `dns_server`.
    dns_server: String,
    config_path: PathBuf,
    scratch: Option<Scratch>,
}

impl Pebble {
    /// A CA validating challenges on the given ports.
    pub fn builder() -> PebbleBuilder {
        PebbleBuilder::default()
    }

    /// The ACME directory URL.
    pub fn directory_url(&self) -> String {
        format!("https://localhost:{}/dir", self.api_port)
    }

    /// The management API's base URL (`/roots/0`, `/intermediates/0`, ...).
    pub fn management_url(&self) -> String {
        format!("https://localhost:{}", self.mgmt_port)
    }

    /// The CA (PEM) to trust for Pebble's API.
    pub fn api_ca_pem(&self) -> &str {
        &self.api_ca_pem
    }

    /// The same CA as a file.
    pub fn api_ca_path(&self) -> &PathBuf {
        &self.api_ca_path
    }

    /// The DNS test server's management API (plain HTTP: `POST /add-a` with
    /// `{"host": "name.", "addresses": ["127.0.0.2"]}` points a name elsewhere).
    pub fn dns_management_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.dns_mgmt_port)
    }

    /// How many orders Pebble has taken so far (from its log).
    pub fn orders(&self) -> usize {
        self.log().matches("Added order").count()
    }

    /// The DNS server Pebble resolves names with.
    pub fn dns_port(&self) -> u16 {
        self.dns_port
    }

    /// The root (PEM) that certificates issued by this Pebble chain to.
    pub async fn issuing_root_pem(&self) -> Result<String, Error> {
        self.management_get("/roots/0").await
    }

    /// GETs a path on the management API and returns the body.
    pub async fn management_get(&self, path: &str) -> Result<String, Error> {
        let url = format!("{}{path}", self.management_url());
        let response = http::https_get(&url, &self.api_ca_pem).await?;
        if response.status != 200 {
            return Err(Error::Setup(format!(
                "GET {url}: status {}",
                response.status
            )));
        }
        Ok(response.text())
    }

    /// Pebble's log so far (every order and validation shows there).
    pub fn log(&self) -> String {
        self.pebble
            .as_ref()
            .map(|p| format!("{}{}", p.stdout(), p.stderr()))
            .unwrap_or_default()
    }

    /// Stops the CA (the DNS server stays), as an outage of the CA would.
    pub fn stop(&mut self) -> Result<(), Error> {
        if let Some(pebble) = self.pebble.take() {
            pebble.kill()?;
        }
        Ok(())
    }

    /// Starts a stopped CA again on the same ports. Its roots are new: Pebble keeps nothing.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop()?;
        let pebble = ProcBuilder::new(&self.pebble_bin)
            .args(["-config".as_ref(), self.config_path.as_os_str()])
            .args(["-dnsserver", &self.dns_server])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .spawn()?;
        pebble.wait_output("ACME directory available at", START_TIMEOUT)?;
        listening(&pebble, self.api_port)?;
        self.pebble = Some(pebble);
        Ok(())
    }

    /// The DNS test server's process, for tests that change its answers.
    pub fn challtestsrv(&self) -> &Proc {
        &self.challtestsrv
    }
}
