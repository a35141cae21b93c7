//! DNS-01 against real servers: BIND's `named` is primary for `test.example` and takes RFC 2136
//! updates signed with a TSIG key; Pebble resolves through it, so it validates the TXT records
//! the edge publishes there, and `dig` shows what is left in the zone afterwards.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use testkit::{Named, Pebble, ProcBuilder, Scratch};

use crate::support::{EDGE, Edge, Upstreams, WAIT, curl, run};

/// named, a Pebble resolving through it, and an upstream.
struct Lab {
    named: Named,
    pebble: Pebble,
    https_port: u16,
    /// Pebble's issuing root, as a file for curl.
    root: PathBuf,
    _ups: Upstreams,
    web: String,
}

impl Lab {
    fn start(validity: Option<Duration>) -> Lab {
        let named = Named::builder().start().unwrap();
        let https_port = testkit::ports::free_port().unwrap();
        let mut builder = Pebble::builder()
            .dns_server(named.addr())
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
        Lab {
            named,
            pebble,
            https_port,
            root,
            _ups: ups,
            web,
        }
    }

    /// A Caddyfile serving `*.test.example` with its certificate by RFC 2136; the TSIG secret
    /// comes from `{env.EDGE_TSIG_KEY}`. `globals` go into the global options.
    fn caddyfile(&self, dir: &Scratch, globals: &str) -> PathBuf {
        let text = format!(
            "{{\n\thttp_port 0\n\thttps_port {https}\n\tdefault_bind 127.0.0.1\n\
             \tstorage file_system {storage}\n\temail ops@example.org\n\tacme_ca {ca}\n\
             \tacme_ca_root {ca_root}\n\tacme_retry_base 200ms\n{globals}}}\n\n\
             *.test.example {{\n\ttls {{\n\t\tdns rfc2136 {{\n\t\t\tkey_name {key_name}\n\
             \t\t\tkey_alg {alg}\n\t\t\tkey {{env.EDGE_TSIG_KEY}}\n\t\t\tserver {server}\n\t\t}}\n\
             \t\tresolvers {server}\n\t\tpropagation_timeout 30s\n\t}}\n\treverse_proxy {web}\n}}\n",
            https = self.https_port,
            storage = dir.join("storage").display(),
            ca = self.pebble.directory_url(),
            ca_root = self.pebble.api_ca_path().display(),
            key_name = self.named.key_name(),
            alg = self.named.key_alg(),
            server = self.named.addr(),
            web = self.web,
        );
        let path = dir.join("Caddyfile");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `edge run` on `config` with `key` as the TSIG secret in its environment.
    fn edge(&self, dir: Scratch, config: PathBuf, key: &str) -> Edge {
        let proc = ProcBuilder::new(EDGE)
            .args([
                OsStr::new("run"),
                OsStr::new("--caddyfile"),
                config.as_os_str(),
            ])
            .env("LABKIT_LOG", "info,edge=debug")
            .env("EDGE_TSIG_KEY", key)
            .notify()
            .spawn()
            .unwrap();
        proc.wait_ready(WAIT).unwrap();
        Edge { proc, dir, config }
    }

    fn assert_serves(&self, name: &str) {
        let out = curl(&[
            "-sS".into(),
            "--max-time".into(),
            "30".into(),
            "--cacert".into(),
            self.root.display().to_string(),
            "--resolve".into(),
            format!("{name}:{}:127.0.0.1", self.https_port),
            format!("https://{name}:{}/", self.https_port),
        ]);
        assert_eq!(out.code, 0, "{name}: {out:?}");
        assert_eq!(out.stdout, "web /", "{name}");
    }

    fn challenge_records(&self) -> Vec<String> {
        self.named.txt("_acme-challenge.test.example").unwrap()
    }
}

#[test]
fn a_wildcard_site_gets_one_certificate_by_rfc2136_renews_it_and_leaves_no_txt_record() {
    // Certificates for two minutes, renewed when 95% is left: due six seconds after issue.
    let lab = Lab::start(Some(Duration::from_secs(120)));
    // A record of someone else's on the same name, which must survive every cleanup.
    lab.named
        .update("update add _acme-challenge.test.example 60 TXT \"not-edges\"")
        .unwrap();
    let dir = Scratch::new("edge-dns01").unwrap();
    let config = lab.caddyfile(&dir, "\trenewal_window_ratio 0.95\n");
    let edge = lab.edge(dir, config, lab.named.key_secret());
    edge.proc
        .wait_output("certificate obtained name=*.test.example ", WAIT)
        .unwrap();
    lab.assert_serves("a.test.example");
    lab.assert_serves("b.test.example");
    // One order, for the wildcard, whose TXT record is gone and the other one kept.
    assert_eq!(lab.pebble.orders(), 1, "{}", lab.pebble.log());
    assert_eq!(lab.challenge_records(), ["not-edges"]);
    let log = edge.proc.stderr();
    assert!(
        log.contains("challenge ready name=*.test.example challenge=Dns01"),
        "{log}"
    );
    assert!(log.contains("DNS-01 record deleted"), "{log}");
    let ca = edge::acme::ca_key(&lab.pebble.directory_url());
    let stored = edge.dir.join(format!(
        "storage/certificates/acme/{ca}/wildcard_.test.example/wildcard_.test.example.crt"
    ));
    assert!(stored.exists(), "{}", stored.display());

    // Renewal goes the same way.
    edge.proc
        .wait_output("certificate renewed name=*.test.example", WAIT)
        .unwrap();
    assert!(lab.pebble.orders() >= 2, "{}", lab.pebble.log());
    assert_eq!(lab.challenge_records(), ["not-edges"]);
    lab.assert_serves("c.test.example");
    edge.stop();
}

#[test]
fn a_wrong_tsig_key_fails_the_order_with_an_error_naming_the_provider_and_the_server() {
    let lab = Lab::start(None);
    let dir = Scratch::new("edge-dns01").unwrap();
    let config = lab.caddyfile(&dir, "");
    // A valid base64 secret that is not the server's.
    let edge = lab.edge(
        dir,
        config,
        "c2VjcmV0LXRoYXQtaXMtbm90LXRoZS1zZXJ2ZXJzLWtleQ==",
    );
    let line = edge
        .proc
        .wait_output("certificate order failed", WAIT)
        .unwrap();
    let server = lab.named.addr().to_string();
    assert!(line.contains("DNS provider rfc2136"), "{line}");
    assert!(line.contains(&server), "{line}");
    assert!(line.contains("NOTAUTH"), "{line}");
    assert!(line.contains("edge-key"), "{line}");
    assert!(!line.contains("c2VjcmV0"), "the secret leaked: {line}");
    assert!(lab.challenge_records().is_empty());
    edge.stop();
}

#[test]
fn a_public_wildcard_without_a_dns_provider_is_refused_at_check_with_its_line() {
    let dir = Scratch::new("edge-dns01").unwrap();
    let path = dir.join("Caddyfile");
    std::fs::write(
        &path,
        "{\n\thttp_port 0\n\thttps_port 0\n}\n\n*.example.org {\n\treverse_proxy 127.0.0.1:9\n}\n",
    )
    .unwrap();
    let out = run(
        EDGE,
        &[
            OsStr::new("check"),
            OsStr::new("--caddyfile"),
            path.as_os_str(),
        ],
    );
    assert_eq!(out.code, 78, "{out:?}");
    assert!(out.stderr.contains("Caddyfile:6:"), "{out:?}");
    assert!(out.stderr.contains("DNS-01"), "{out:?}");
    assert!(out.stderr.contains("acme_dns"), "{out:?}");
}
