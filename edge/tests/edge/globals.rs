//! TLS from a site's own files, global options, logs and the admin endpoint, against Caddy
//! where a user can see the difference.

use std::path::Path;

use testkit::Scratch;

use crate::differential::Both;
use crate::support::{EDGE, Edge, WAIT, curl, globals, run};

/// A self-signed certificate for `names`, written as `NAME.crt`/`NAME.key` in `dir`.
fn self_signed(dir: &Path, file: &str, names: &[&str]) {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let made = rcgen::generate_simple_self_signed(names).unwrap();
    std::fs::write(dir.join(format!("{file}.crt")), made.cert.pem()).unwrap();
    std::fs::write(
        dir.join(format!("{file}.key")),
        made.signing_key.serialize_pem(),
    )
    .unwrap();
}

/// `curl https://HOST:PORT/` trusting only `ca`.
fn get_trusting(ca: &Path, host: &str, port: u16) -> crate::support::Ran {
    curl(&[
        "-sS".into(),
        "--max-time".into(),
        "20".into(),
        "--cacert".into(),
        ca.display().to_string(),
        "--resolve".into(),
        format!("{host}:{port}:127.0.0.1"),
        format!("https://{host}:{port}/"),
    ])
}

#[test]
fn certificate_files_are_served_for_the_sites_names_as_caddy_serves_them() {
    let certs = Scratch::new("edge-cert-files").unwrap();
    self_signed(certs.path(), "secure", &["secure.example.org"]);
    let both = Both::start_with(
        crate::support::Upstreams::new(),
        "secure.example.org {\n\ttls @CERTS@/secure.crt @CERTS@/secure.key\n\trespond \"from files\"\n}\n",
        &[("@CERTS@", certs.path().display().to_string())],
    );
    let (edge, caddy) = both.https_ports;
    let ca = certs.join("secure.crt");
    for (who, port) in [("edge", edge), ("caddy", caddy)] {
        let got = get_trusting(&ca, "secure.example.org", port);
        assert_eq!(
            (got.code, got.stdout.as_str()),
            (0, "from files"),
            "{who}: {got:?}"
        );
    }
    both.stop();
}

#[test]
fn a_reload_serves_new_certificate_files_and_a_key_that_does_not_match_is_refused_by_name() {
    let dir = Scratch::new("edge-cert-reload").unwrap();
    self_signed(dir.path(), "one", &["files.example.org"]);
    self_signed(dir.path(), "two", &["files.example.org"]);
    let config = dir.join("Caddyfile");
    let (head, base) = (globals(&dir, ""), dir.path().to_owned());
    let site = move |cert: &str, key: &str| {
        format!(
            "{head}files.example.org {{\n\ttls {} {}\n\trespond \"ok\"\n}}\n",
            base.join(cert).display(),
            base.join(key).display()
        )
    };
    std::fs::write(&config, site("one.crt", "one.key")).unwrap();
    // A key of another certificate: `edge run` refuses at start, naming the key file.
    std::fs::write(&config, site("one.crt", "two.key")).unwrap();
    let ran = run(EDGE, &["run", "--caddyfile", config.to_str().unwrap()]);
    assert_eq!(ran.code, 65, "{ran:?}");
    assert!(
        ran.stderr
            .contains(&dir.join("two.key").display().to_string())
            && ran.stderr.contains("is not the key of the certificate"),
        "{ran:?}"
    );
    std::fs::write(&config, site("one.crt", "one.key")).unwrap();
    let edge = Edge::start(dir, config.clone(), "--caddyfile");
    let https = edge.port("https");
    let one = edge.dir.join("one.crt");
    let two = edge.dir.join("two.crt");
    assert_eq!(get_trusting(&one, "files.example.org", https).stdout, "ok");
    assert_ne!(get_trusting(&two, "files.example.org", https).code, 0);

    // The same paths with new contents: a reload reads them again.
    std::fs::copy(edge.dir.join("two.crt"), edge.dir.join("one.crt")).unwrap();
    std::fs::copy(edge.dir.join("two.key"), edge.dir.join("one.key")).unwrap();
    edge.proc.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    edge.proc.wait_notification("RELOADING=1", WAIT).unwrap();
    edge.proc.wait_ready(WAIT).unwrap();
    edge.proc.wait_stderr("reloaded", WAIT).unwrap();
    assert_eq!(get_trusting(&two, "files.example.org", https).stdout, "ok");

    // A missing key file on reload: refused by name, the old certificate keeps serving.
    std::fs::write(&config, site("two.crt", "gone.key")).unwrap();
    edge.proc.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    let rejected = edge.proc.wait_stderr("new config rejected", WAIT).unwrap();
    assert!(rejected.contains("gone.key"), "{rejected}");
    assert_eq!(get_trusting(&two, "files.example.org", https).stdout, "ok");
    edge.stop();
}
