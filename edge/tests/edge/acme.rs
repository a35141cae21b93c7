//! ACME against a real CA: testkit's Pebble, whose DNS answers 127.0.0.1 for every name, so
//! it validates challenges against the edge under test on the ports it was started with.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use testkit::{Pebble, Scratch};
use tokio::net::TcpStream;

use crate::support::{EDGE, Edge, Ran, Upstreams, WAIT, client_config, curl, run};

/// A Pebble validating on free ports, and the edge config pointing at it.
struct Lab {
    pebble: Pebble,
    http_port: u16,
    https_port: u16,
    /// Pebble's issuing root, as a file for curl.
    root: PathBuf,
    ups: Upstreams,
    web: String,
    git: String,
}

impl Lab {
    fn start(validity: Option<Duration>) -> Lab {
        Lab::start_with(validity, None)
    }

    /// `http_check_port`: where Pebble fetches HTTP-01 answers, when not the edge's port.
    fn start_with(validity: Option<Duration>, http_check_port: Option<u16>) -> Lab {
        let http_port = testkit::ports::free_port().unwrap();
        let https_port = testkit::ports::free_port().unwrap();
        let mut builder = Pebble::builder()
            .http_port(http_check_port.unwrap_or(http_port))
            .tls_port(https_port);
        if let Some(v) = validity {
            builder = builder.cert_validity(v);
        }
        let pebble = builder.start().unwrap();
        let ups = Upstreams::new();
        let root_pem = ups.runtime.block_on(pebble.issuing_root_pem()).unwrap();
        let root = pebble.api_ca_path().with_file_name("issuing-root.pem");
        std::fs::write(&root, root_pem).unwrap();
        let web = ups.http("web").to_string();
        let git = ups.http("git").to_string();
        Lab {
            pebble,
            http_port,
            https_port,
            root,
            ups,
            web,
            git,
        }
    }

    /// A TOML config for `sites` (name, upstream) with `acme` lines in the `[acme]` table.
    fn config(&self, dir: &Scratch, sites: &[(&str, &str)], top: &str, acme: &str) -> PathBuf {
        let mut text = format!(
            "http_port = {}\nhttps_port = {}\nbind = [\"127.0.0.1\"]\nstorage = \"{}\"\n\
             email = \"ops@example.org\"\nacme_ca = \"{}\"\nacme_ca_root = \"{}\"\n{top}\n\
             [acme]\nretry_base = \"200ms\"\n{acme}\n",
            self.http_port,
            self.https_port,
            dir.join("storage").display(),
            self.pebble.directory_url(),
            self.pebble.api_ca_path().display(),
        );
        for (name, upstream) in sites {
            text.push_str(&format!(
                "\n[[site]]\naddresses = [\"{name}\"]\n[[site.reverse_proxy]]\nto = [\"{upstream}\"]\n"
            ));
        }
        let path = dir.join("edge.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn edge(&self, dir: Scratch, config: PathBuf) -> Edge {
        Edge::start(dir, config, "-c")
    }

    /// curl trusting only Pebble's issuing root.
    fn curl(&self, name: &str) -> Ran {
        curl(&[
            "-sS".into(),
            "--max-time".into(),
            "60".into(),
            "--cacert".into(),
            self.root.display().to_string(),
            "--resolve".into(),
            format!("{name}:{}:127.0.0.1", self.https_port),
            format!("https://{name}:{}/", self.https_port),
        ])
    }

    fn assert_serves(&self, name: &str, upstream: &str) {
        let out = self.curl(name);
        assert_eq!(out.code, 0, "{name}: {out:?}");
        assert_eq!(out.stdout, format!("{upstream} /"), "{name}");
    }
}

fn storage_file(dir: &Scratch, lab: &Lab, name: &str, ext: &str) -> PathBuf {
    let ca = edge::acme::ca_key(&lab.pebble.directory_url());
    dir.join(format!(
        "storage/certificates/acme/{ca}/{name}/{name}.{ext}"
    ))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn status(config: &Path) -> Vec<serde_json::Value> {
    let out = run(
        EDGE,
        &[
            "status".as_ref(),
            "-c".as_ref(),
            config.as_os_str(),
            "--format".as_ref(),
            "json".as_ref(),
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The `retry_in_ms` of each failed attempt for `name`, in log order.
fn retry_delays(edge: &Edge, name: &str) -> Vec<u64> {
    edge.proc
        .stderr()
        .lines()
        .filter(|l| l.contains("certificate order failed") && l.contains(&format!("name={name} ")))
        .filter_map(|l| {
            let (_, rest) = l.split_once("retry_in_ms=")?;
            rest.split(' ').next()?.parse().ok()
        })
        .collect()
}

fn wait_obtained(edge: &Edge, name: &str) -> String {
    edge.proc
        .wait_output(&format!("certificate obtained name={name} "), WAIT)
        .unwrap()
}

#[test]
fn http01_obtains_both_sites_and_a_restart_serves_them_without_a_new_order() {
    let lab = Lab::start(None);
    let dir = Scratch::new("edge-acme").unwrap();
    let sites = [
        ("lab.example.org", lab.web.as_str()),
        ("git.example.org", lab.git.as_str()),
    ];
    let config = lab.config(&dir, &sites, "", "challenges = [\"http-01\"]");
    let edge = lab.edge(dir, config.clone());
    wait_obtained(&edge, "lab.example.org");
    wait_obtained(&edge, "git.example.org");
    lab.assert_serves("lab.example.org", "web");
    lab.assert_serves("git.example.org", "git");
    assert_eq!(lab.pebble.orders(), 2, "{}", lab.pebble.log());
    let log = edge.proc.stderr();
    assert!(
        log.contains("challenge ready name=lab.example.org challenge=Http01"),
        "{log}"
    );

    // Keys and the account stay private.
    assert_eq!(
        mode(&storage_file(&edge.dir, &lab, "lab.example.org", "key")),
        0o600
    );
    let ca = edge::acme::ca_key(&lab.pebble.directory_url());
    let account = edge
        .dir
        .join(format!("storage/acme/{ca}/accounts/ops@example.org.json"));
    assert_eq!(mode(&account), 0o600);

    let lines = status(&config);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        assert_eq!(line["issuer"], lab.pebble.directory_url());
        assert!(line["expires"].is_string(), "{line}");
        assert!(line["next_renewal"].is_string(), "{line}");
        assert!(line["last_error"].is_null(), "{line}");
    }

    edge.stop();
    let Edge { dir, .. } = edge;
    let edge = lab.edge(dir, config);
    // Served from READY on, before any order could have finished.
    lab.assert_serves("lab.example.org", "web");
    lab.assert_serves("git.example.org", "git");
    assert!(
        edge.proc
            .stderr()
            .contains("serving the stored certificate name=git.example.org"),
        "{}",
        edge.proc.stderr()
    );
    assert_eq!(lab.pebble.orders(), 2, "{}", lab.pebble.log());
    edge.stop();
    assert_eq!(lab.pebble.orders(), 2);
    assert!(!edge.proc.stderr().contains("ordering a certificate"));
}

#[test]
fn a_site_whose_acme_issuer_disables_the_http_challenge_obtains_by_tls_alpn01_alone() {
    // Pebble checks HTTP-01 on a port nobody listens on, and the global challenges allow
    // both: only the site's own `disable_http_challenge` makes the order pass.
    let closed = testkit::ports::free_port().unwrap();
    let lab = Lab::start_with(None, Some(closed));
    let dir = Scratch::new("edge-acme").unwrap();
    let config = lab.config(&dir, &[], "", "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[site]]\naddresses = [\"lab.example.org\"]\ntls_challenges = [\"tls-alpn-01\"]\n[[site.reverse_proxy]]\nto = [\"{}\"]\n",
        lab.web
    ));
    std::fs::write(&config, text).unwrap();
    let edge = lab.edge(dir, config);
    wait_obtained(&edge, "lab.example.org");
    lab.assert_serves("lab.example.org", "web");
    let log = edge.proc.stderr();
    assert!(
        log.contains("challenge ready name=lab.example.org challenge=TlsAlpn01"),
        "{log}"
    );
    assert!(!log.contains("challenge=Http01"), "{log}");
    edge.stop();
}

#[test]
fn tls_alpn01_alone_obtains_rsa_certificates_with_the_http_port_closed_to_the_ca() {
    // Pebble checks HTTP-01 on a port nobody listens on: only TLS-ALPN-01 can pass.
    let closed = testkit::ports::free_port().unwrap();
    let lab = Lab::start_with(None, Some(closed));
    let dir = Scratch::new("edge-acme").unwrap();
    let sites = [
        ("lab.example.org", lab.web.as_str()),
        ("git.example.org", lab.git.as_str()),
    ];
    let config = lab.config(
        &dir,
        &sites,
        "key_type = \"rsa2048\"",
        "challenges = [\"tls-alpn-01\"]",
    );
    let edge = lab.edge(dir, config);
    wait_obtained(&edge, "lab.example.org");
    wait_obtained(&edge, "git.example.org");
    lab.assert_serves("lab.example.org", "web");
    lab.assert_serves("git.example.org", "git");
    let log = edge.proc.stderr();
    assert!(
        log.contains("challenge ready name=git.example.org challenge=TlsAlpn01"),
        "{log}"
    );
    assert!(log.contains("answered an acme-tls/1 challenge"), "{log}");
    assert!(!log.contains("challenge=Http01"), "{log}");

    let pem = std::fs::read(storage_file(&edge.dir, &lab, "lab.example.org", "crt")).unwrap();
    let der = rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
        .next()
        .map(|c: Result<rustls::pki_types::CertificateDer<'static>, _>| c.unwrap())
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(
        cert.public_key().algorithm.algorithm.to_id_string(),
        "1.2.840.113549.1.1.1",
        "an RSA key"
    );
    edge.stop();
}

/// One HTTP/1.1 request on an open connection; the status.
async fn get(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) -> u16 {
    let req = hyper::Request::get("/")
        .header("host", "lab.example.org")
        .body(Empty::new())
        .unwrap();
    // The previous exchange must finish before the connection takes the next request.
    sender.ready().await.unwrap();
    let response = sender.send_request(req).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"web /");
    status
}

/// The leaf a new TLS connection to `name` gets, and the open connection.
async fn connect(
    lab: &Lab,
    name: &'static str,
) -> (
    Vec<u8>,
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
) {
    let tcp = TcpStream::connect(("127.0.0.1", lab.https_port))
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(&lab.root, &[b"http/1.1"]));
    let tls = connector
        .connect(ServerName::try_from(name).unwrap(), tcp)
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    (leaf, sender)
}

#[test]
fn a_forced_renewal_replaces_the_certificate_under_an_open_connection_and_no_request_fails() {
    // Certificates for two minutes, renewed when 95% is left: due six seconds after issue.
    let lab = Lab::start(Some(Duration::from_secs(120)));
    let dir = Scratch::new("edge-acme").unwrap();
    let config = lab.config(
        &dir,
        &[("lab.example.org", lab.web.as_str())],
        "access_log = \"off\"",
        "renewal_window_ratio = 0.95",
    );
    let edge = lab.edge(dir, config);
    wait_obtained(&edge, "lab.example.org");
    let runtime = &lab.ups.runtime;
    let (first, mut held) = runtime.block_on(connect(&lab, "lab.example.org"));
    assert_eq!(runtime.block_on(get(&mut held)), 200);
    // Requests keep flowing on the held connection until the renewal is logged.
    let renewed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = renewed.clone();
    let requests = runtime.spawn(async move {
        let mut n = 0u32;
        while !flag.load(std::sync::atomic::Ordering::Acquire) {
            assert_eq!(get(&mut held).await, 200);
            n += 1;
            tokio::task::yield_now().await;
        }
        assert_eq!(get(&mut held).await, 200);
        n + 1
    });
    edge.proc
        .wait_output("certificate renewed name=lab.example.org", WAIT)
        .unwrap();
    renewed.store(true, std::sync::atomic::Ordering::Release);
    let n = runtime.block_on(requests).unwrap();
    assert!(n >= 2, "{n} requests");
    let (second, mut fresh) = runtime.block_on(connect(&lab, "lab.example.org"));
    assert_ne!(first, second, "a new connection gets the new certificate");
    assert_eq!(runtime.block_on(get(&mut fresh)), 200);
    assert!(lab.pebble.orders() >= 2);
    edge.stop();
}

#[test]
fn with_the_ca_down_failures_are_retried_with_growing_delays_and_stored_certificates_serve() {
    let mut lab = Lab::start(Some(Duration::from_secs(200)));
    let dir = Scratch::new("edge-acme").unwrap();
    // Due for renewal 10 seconds after issue.
    let acme = "renewal_window_ratio = 0.95";
    let config = lab.config(&dir, &[("lab.example.org", lab.web.as_str())], "", acme);
    let edge = lab.edge(dir, config);
    wait_obtained(&edge, "lab.example.org");
    lab.pebble.stop().unwrap();

    // Renewal failures: logged with growing delays while the certificate serves.
    edge.proc
        .wait_output(
            "certificate order failed; the current certificate keeps serving name=lab.example.org attempt=3 ",
            WAIT,
        )
        .unwrap();
    lab.assert_serves("lab.example.org", "web");
    let delays = retry_delays(&edge, "lab.example.org");
    assert!(
        delays.len() >= 3 && delays.windows(2).all(|w| w[0] < w[1]),
        "{delays:?}"
    );
    edge.stop();

    // Start failures: a new name is retried while the stored one serves from the start.
    let Edge { dir, .. } = edge;
    let sites = [
        ("lab.example.org", lab.web.as_str()),
        ("git.example.org", lab.git.as_str()),
    ];
    let config = lab.config(&dir, &sites, "", acme);
    let edge = lab.edge(dir, config.clone());
    lab.assert_serves("lab.example.org", "web");
    edge.proc
        .wait_output(
            "certificate order failed; the name is not served until it succeeds name=git.example.org attempt=3 ",
            WAIT,
        )
        .unwrap();
    let delays = retry_delays(&edge, "git.example.org");
    assert!(
        delays.len() >= 3 && delays.windows(2).all(|w| w[0] < w[1]),
        "{delays:?}"
    );
    assert!(delays[0] < 1000, "a 200ms base: {delays:?}");
    lab.assert_serves("lab.example.org", "web");
    let git = status(&config)
        .into_iter()
        .find(|l| l["name"] == "git.example.org")
        .unwrap();
    assert!(
        git["last_error"].as_str().unwrap().contains("ACME"),
        "{git}"
    );
    assert!(git["failures"].as_u64().unwrap() >= 3, "{git}");
    assert!(git["expires"].is_null(), "{git}");
    edge.stop();
}

#[test]
fn a_corrupt_stored_certificate_or_key_is_reported_by_name_and_ordered_again() {
    let lab = Lab::start(None);
    let dir = Scratch::new("edge-acme").unwrap();
    let sites = [
        ("lab.example.org", lab.web.as_str()),
        ("git.example.org", lab.git.as_str()),
    ];
    let config = lab.config(&dir, &sites, "", "");
    let edge = lab.edge(dir, config.clone());
    wait_obtained(&edge, "lab.example.org");
    wait_obtained(&edge, "git.example.org");
    edge.stop();
    let Edge { dir, .. } = edge;
    let crt = storage_file(&dir, &lab, "lab.example.org", "crt");
    std::fs::write(
        &crt,
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(storage_file(&dir, &lab, "git.example.org", "key"), "junk").unwrap();

    let edge = lab.edge(dir, config);
    let line = edge
        .proc
        .wait_output(
            "stored certificate unusable; ordering a new one name=lab.example.org",
            WAIT,
        )
        .unwrap();
    assert!(line.contains("lab.example.org.crt"), "{line}");
    let line = edge
        .proc
        .wait_output(
            "stored certificate unusable; ordering a new one name=git.example.org",
            WAIT,
        )
        .unwrap();
    assert!(line.contains("git.example.org.key"), "{line}");
    wait_obtained(&edge, "lab.example.org");
    wait_obtained(&edge, "git.example.org");
    lab.assert_serves("lab.example.org", "web");
    lab.assert_serves("git.example.org", "git");
    assert_eq!(lab.pebble.orders(), 4, "{}", lab.pebble.log());
    edge.stop();
}

#[test]
fn a_name_whose_dns_points_elsewhere_fails_alone_with_the_cas_problem_document() {
    let lab = Lab::start(None);
    let add = curl(&[
        "-sS".into(),
        "-d".into(),
        r#"{"host":"broken.example.org","addresses":["127.0.0.2"]}"#.into(),
        format!("{}/add-a", lab.pebble.dns_management_url()),
    ]);
    assert_eq!(add.code, 0, "{add:?}");
    let dir = Scratch::new("edge-acme").unwrap();
    let sites = [
        ("lab.example.org", lab.web.as_str()),
        ("broken.example.org", lab.git.as_str()),
    ];
    let config = lab.config(&dir, &sites, "", "challenges = [\"http-01\"]");
    let edge = lab.edge(dir, config);
    wait_obtained(&edge, "lab.example.org");
    lab.assert_serves("lab.example.org", "web");
    let line = edge
        .proc
        .wait_output(
            "certificate order failed; the name is not served until it succeeds name=broken.example.org attempt=2 ",
            WAIT,
        )
        .unwrap();
    assert!(line.contains("urn:ietf:params:acme:error:"), "{line}");
    lab.assert_serves("lab.example.org", "web");
    edge.stop();
}

#[test]
fn two_edges_sharing_the_storage_order_each_name_once() {
    let lab = Lab::start(None);
    let dir = Scratch::new("edge-acme").unwrap();
    let sites = [
        ("lab.example.org", lab.web.as_str()),
        ("git.example.org", lab.git.as_str()),
    ];
    let config = lab.config(&dir, &sites, "", "challenges = [\"http-01\"]");
    // Both listen on the same ports (SO_REUSEPORT), as two edges behind one address would:
    // the CA's check may reach either, and either answers from the shared storage.
    let spawn = |config: &Path| {
        testkit::ProcBuilder::new(EDGE)
            .args(["run".as_ref(), "-c".as_ref(), config.as_os_str()])
            .env("LABKIT_LOG", "info,edge=debug")
            .notify()
            .spawn()
            .unwrap()
    };
    let one = spawn(&config);
    let two = spawn(&config);
    one.wait_ready(WAIT).unwrap();
    two.wait_ready(WAIT).unwrap();
    for proc in [&one, &two] {
        for name in ["lab.example.org", "git.example.org"] {
            // Ordered, found in storage after the other's order, or served from storage.
            proc.wait_output(&format!("certificate installed name={name}"), WAIT)
                .unwrap();
        }
    }
    assert_eq!(lab.pebble.orders(), 2, "{}", lab.pebble.log());
    let logs = format!("{}{}", one.stderr(), two.stderr());
    assert_eq!(logs.matches("ordering a certificate").count(), 2, "{logs}");
    lab.assert_serves("lab.example.org", "web");
    lab.assert_serves("git.example.org", "git");
    one.stop(WAIT).unwrap();
    two.stop(WAIT).unwrap();
}
