//! A site's own ACME issuer (`tls { ca; ca_root; eab; key_type }`) and the global
//! `acme_eab`, against real CAs: testkit's Pebble, one per CA, validating on the edge's ports.

use std::path::{Path, PathBuf};

use rustls::pki_types::ServerName;
use testkit::{Pebble, Scratch};
use tokio::net::TcpStream;

use crate::support::{EDGE, Edge, Upstreams, WAIT, client_config, run};

/// The MAC key the EAB-requiring Pebble gives out (base64url, as ZeroSSL shows it).
const MAC_KEY: &str = "Tz9SIx_05njYuSVqot37jWrKv9RZfhwN41DBw3At4pU";
const EAB_KEYS: &[(&str, &str)] = &[("kid-lab", MAC_KEY)];

/// Pebble's issuing root as a file next to its API CA.
fn issuing_root(pebble: &Pebble, ups: &Upstreams, name: &str) -> PathBuf {
    let root = pebble.api_ca_path().with_file_name(name);
    std::fs::write(
        &root,
        ups.runtime.block_on(pebble.issuing_root_pem()).unwrap(),
    )
    .unwrap();
    root
}

/// A TLS handshake for `name` trusting only `root`: the leaf the client was shown.
async fn handshake(port: u16, root: PathBuf, name: &'static str) -> Result<Vec<u8>, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(client_config(&root, &[b"http/1.1"]));
    let tls = connector
        .connect(ServerName::try_from(name).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

/// The public key algorithm OID of a DER certificate.
fn key_algorithm(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.public_key().algorithm.algorithm.to_id_string()
}

fn globals(dir: &Scratch, http_port: u16, https_port: u16, pebble: &Pebble, extra: &str) -> String {
    format!(
        "{{\n\thttp_port {http_port}\n\thttps_port {https_port}\n\tdefault_bind 127.0.0.1\n\
         \tstorage file_system {}\n\temail ops@example.org\n\tacme_ca {}\n\tacme_ca_root {}\n\
         \tacme_retry_base 200ms\n{extra}}}\n\n",
        dir.join("storage").display(),
        pebble.directory_url(),
        pebble.api_ca_path().display(),
    )
}

fn write(dir: &Scratch, text: &str) -> PathBuf {
    let path = dir.join("Caddyfile");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_site_with_its_own_ca_and_key_type_orders_there_while_another_site_uses_the_global_ca() {
    let http_port = testkit::ports::free_port().unwrap();
    let https_port = testkit::ports::free_port().unwrap();
    let global = Pebble::builder()
        .http_port(http_port)
        .tls_port(https_port)
        .start()
        .unwrap();
    let own = Pebble::builder()
        .http_port(http_port)
        .tls_port(https_port)
        .start()
        .unwrap();
    let ups = Upstreams::new();
    let global_root = issuing_root(&global, &ups, "global-root.pem");
    let own_root = issuing_root(&own, &ups, "own-root.pem");
    let dir = Scratch::new("edge-issuers").unwrap();
    let text = format!(
        "{}old.example.org {{\n\ttls {{\n\t\tca {}\n\t\tca_root {}\n\t\tkey_type rsa2048\n\t}}\n\
         \trespond \"old\"\n}}\n\nnew.example.org {{\n\trespond \"new\"\n}}\n",
        globals(&dir, http_port, https_port, &global, ""),
        own.directory_url(),
        own.api_ca_path().display(),
    );
    let caddyfile = write(&dir, &text);
    let edge = Edge::start(dir, caddyfile, "--caddyfile");
    for name in ["old.example.org", "new.example.org"] {
        edge.proc
            .wait_output(&format!("certificate obtained name={name} "), WAIT)
            .unwrap_or_else(|e| panic!("{e}\n{}", edge.proc.stderr()));
    }
    assert_eq!(own.orders(), 1, "the site's own CA took its one order");
    assert_eq!(global.orders(), 1, "the global CA took the other");

    // Each leaf chains to its own CA's root (the client trusts nothing else), and the
    // client sees the key type each site asked for.
    let (old, new, crossed) = ups.runtime.block_on(async {
        (
            handshake(https_port, own_root.clone(), "old.example.org").await,
            handshake(https_port, global_root.clone(), "new.example.org").await,
            handshake(https_port, global_root.clone(), "old.example.org").await,
        )
    });
    let old = old.unwrap();
    assert_eq!(key_algorithm(&old), "1.2.840.113549.1.1.1", "an RSA key");
    let (_, cert) = x509_parser::parse_x509_certificate(&old).unwrap();
    let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = cert.public_key().parsed() else {
        panic!("not RSA");
    };
    assert_eq!(rsa.key_size(), 2048);
    assert_eq!(
        key_algorithm(&new.unwrap()),
        "1.2.840.10045.2.1",
        "the default ECDSA key"
    );
    assert!(crossed.is_err(), "old.example.org is not the global CA's");
    edge.stop();
}

#[test]
fn an_eab_requiring_ca_refuses_a_site_without_eab_and_issues_to_one_with_it_never_logging_the_mac_key()
 {
    let http_port = testkit::ports::free_port().unwrap();
    let https_port = testkit::ports::free_port().unwrap();
    let pebble = Pebble::builder()
        .http_port(http_port)
        .tls_port(https_port)
        .eab_keys(EAB_KEYS)
        .start()
        .unwrap();
    let ups = Upstreams::new();
    let root = issuing_root(&pebble, &ups, "root.pem");
    let dir = Scratch::new("edge-issuers").unwrap();
    let text = format!(
        "{}bound.example.org {{\n\ttls {{\n\t\teab kid-lab {MAC_KEY}\n\t}}\n\trespond \"bound\"\n}}\n\n\
         unbound.example.org {{\n\trespond \"unbound\"\n}}\n",
        globals(&dir, http_port, https_port, &pebble, ""),
    );
    let caddyfile = write(&dir, &text);

    let adapted = run(EDGE, &["adapt", "--caddyfile", caddyfile.to_str().unwrap()]);
    assert_eq!(adapted.code, 0, "{adapted:?}");
    assert!(!adapted.stdout.contains(MAC_KEY), "{}", adapted.stdout);
    assert!(adapted.stdout.contains("[redacted]"), "{}", adapted.stdout);

    let edge = Edge::start(dir, caddyfile, "--caddyfile");
    edge.proc
        .wait_output("certificate obtained name=bound.example.org ", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.proc.stderr()));
    let failed = edge
        .proc
        .wait_output("succeeds name=unbound.example.org attempt=1 ", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.proc.stderr()));
    assert!(failed.contains("externalAccountRequired"), "{failed}");
    let leaf = ups
        .runtime
        .block_on(handshake(https_port, root.clone(), "bound.example.org"))
        .unwrap();
    assert!(!leaf.is_empty());
    let log = edge.proc.stderr();
    assert!(!log.contains(MAC_KEY), "the MAC key is in the log");
    assert!(!storage_holds(&edge.dir.join("storage"), MAC_KEY));
    edge.stop();
}

/// Whether any stored file holds `text` (the MAC key is never written down).
fn storage_holds(dir: &Path, text: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        if path.is_dir() {
            storage_holds(&path, text)
        } else {
            std::fs::read(&path).is_ok_and(|b| String::from_utf8_lossy(&b).contains(text))
        }
    })
}
