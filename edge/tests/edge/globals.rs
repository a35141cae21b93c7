//! TLS from a site's own files, global options, logs and the admin endpoint, against Caddy
//! where a user can see the difference.

use std::path::Path;

use testkit::Scratch;

use crate::differential::Both;
use crate::support::{EDGE, Edge, WAIT, curl, globals, http_request, run};

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

/// The keys of a JSON object, sorted.
fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

/// The first line of `text` that is a JSON object holding `"msg":"handled request"`.
fn access_line(text: &str) -> serde_json::Value {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["msg"] == "handled request")
        .unwrap_or_else(|| panic!("no access log line in:\n{text}"))
}

#[test]
fn a_site_log_in_json_has_caddys_fields_and_values() {
    let both = Both::start(
        "http://plain.local {\n\tlog {\n\t\toutput stdout\n\t\tformat json\n\t\tlevel INFO\n\t}\n\trespond \"logged\" 201\n}\n",
    );
    let req = crate::differential::Req::get("/a/b?c=d")
        .header("User-Agent", "edge-test/1")
        .header("Authorization", "Basic c2VjcmV0");
    both.request(&req).assert_same(&[]);
    let (edge, caddy) = both.procs();
    edge.wait_stdout("handled request", WAIT).unwrap();
    caddy.wait_stdout("handled request", WAIT).unwrap();
    let (e, c) = (access_line(&edge.stdout()), access_line(&caddy.stdout()));
    assert_eq!(keys(&e), keys(&c), "edge {e}\ncaddy {c}");
    assert_eq!(
        keys(&e["request"]),
        keys(&c["request"]),
        "edge {e}\ncaddy {c}"
    );
    for field in ["level", "logger", "msg", "status", "size", "user_id"] {
        assert_eq!(e[field], c[field], "{field}: edge {e}\ncaddy {c}");
    }
    for field in ["remote_ip", "proto", "method", "host", "uri"] {
        assert_eq!(
            e["request"][field], c["request"][field],
            "{field}: edge {e}\ncaddy {c}"
        );
    }
    for header in ["User-Agent", "Authorization"] {
        assert_eq!(
            e["request"]["headers"][header], c["request"]["headers"][header],
            "{header}: edge {e}\ncaddy {c}"
        );
    }
    assert!(
        !edge.stdout().contains("c2VjcmV0"),
        "a credential was logged"
    );
    both.stop();
}

#[test]
fn a_site_log_at_level_error_holds_only_server_errors_and_nothing_goes_to_the_edges_own_log() {
    let dir = Scratch::new("edge-log-level").unwrap();
    let config = dir.join("Caddyfile");
    let log = dir.join("logs/errors.log");
    std::fs::write(
        &config,
        format!(
            "{}http://plain.local {{\n\tlog errors {{\n\t\toutput file {} {{\n\t\t\troll_size 1MB\n\t\t\troll_keep 2\n\t\t}}\n\t\tlevel ERROR\n\t}}\n\trespond /ok \"fine\" 200\n\trespond /bad \"broken\" 503\n}}\n",
            globals(&dir, ""),
            log.display()
        ),
    )
    .unwrap();
    let edge = Edge::start(dir, config, "--caddyfile");
    let port = edge.port("http");
    for path in ["/ok", "/bad", "/ok"] {
        let got = curl(&[
            "-s".into(),
            "-H".into(),
            "Host: plain.local".into(),
            format!("http://127.0.0.1:{port}{path}"),
        ]);
        assert_eq!(got.code, 0, "{got:?}");
    }
    edge.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["status"], 503);
    assert_eq!(lines[0]["level"], "error");
    assert_eq!(lines[0]["logger"], "http.log.access.errors");
    assert!(
        !edge.proc.stdout().contains("/ok"),
        "the site's requests went to the edge's own log too: {}",
        edge.proc.stdout()
    );
}

#[test]
fn auto_https_disable_redirects_leaves_plain_http_unredirected_as_caddy_does() {
    let both = Both::start(
        "{\n\tauto_https disable_redirects\n}\nsecure.local {\n\ttls internal\n\trespond \"tls\"\n}\nhttp://plain.local {\n\trespond \"plain\"\n}\n",
    );
    let plain = both.get("/");
    plain.assert_same(&[]);
    let pair = both.request(&crate::differential::Req::get("/x").host(Some("secure.local")));
    for (who, reply) in [("edge", &pair.edge), ("caddy", &pair.caddy)] {
        assert!(
            !(300..400).contains(&reply.status) && reply.header("location").is_none(),
            "{who} redirected: {reply:?}"
        );
    }
    both.stop();
}

#[test]
fn the_admin_endpoint_shows_the_config_without_secrets_and_refuses_foreign_hosts_and_origins() {
    let dir = Scratch::new("edge-admin").unwrap();
    let port = testkit::ports::free_port().unwrap();
    let config = dir.join("Caddyfile");
    let site = |body: &str| {
        format!(
            "http://plain.local {{\n\tbasic_auth /private/* {{\n\t\talice $2a$04$abcdefghijklmnopqrstuuJ2/h8VXFHbGvd1mXvkykXq5WcWxm3ky\n\t}}\n\trespond \"{body}\"\n}}\n"
        )
    };
    std::fs::write(
        &config,
        format!(
            "{}{}",
            globals(&dir, &format!("\tadmin localhost:{port}\n")),
            site("one")
        ),
    )
    .unwrap();
    let edge = Edge::start(dir, config.clone(), "--caddyfile");
    let (status, body) = http_request(port, "GET", "/config/", &[], "");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json["site"][0]["addresses"][0], "http://plain.local",
        "{body}"
    );
    assert!(body.contains("alice") && !body.contains("$2a$"), "{body}");

    // DNS rebinding (a name resolving to 127.0.0.1) and a cross-site page: refused.
    let (status, _) = http_request(
        port,
        "GET",
        "/config/",
        &[("Host", &format!("evil.example:{port}"))],
        "",
    );
    assert_eq!(status, 403);
    let (status, _) = http_request(
        port,
        "POST",
        "/load",
        &[
            ("Origin", "http://evil.example"),
            ("Content-Type", "text/caddyfile"),
        ],
        "x",
    );
    assert_eq!(status, 403);

    // A load is a reload; a bad one is refused with its line, and the old config serves on.
    let http = edge.port("http");
    let get = || {
        curl(&[
            "-s".into(),
            "-H".into(),
            "Host: plain.local".into(),
            format!("http://127.0.0.1:{http}/"),
        ])
        .stdout
    };
    assert_eq!(get(), "one");
    let new = format!(
        "{}{}",
        globals(&edge.dir, &format!("\tadmin localhost:{port}\n")),
        site("two")
    );
    let (status, body) = http_request(
        port,
        "POST",
        "/load",
        &[("Content-Type", "text/caddyfile")],
        &new,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(), "two");
    let bad = new.replace(
        "\trespond \"two\"\n",
        "\trespond \"three\"\n\tbogus_directive\n",
    );
    let (status, body) = http_request(
        port,
        "POST",
        "/load",
        &[("Content-Type", "text/caddyfile")],
        &bad,
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains(":14: ") && body.contains("bogus_directive"),
        "{body}"
    );
    assert_eq!(get(), "two");
    let (status, _) = http_request(
        port,
        "POST",
        "/load",
        &[("Content-Type", "application/json")],
        "{}",
    );
    assert_eq!(status, 400);

    let (status, _) = http_request(port, "POST", "/stop", &[], "");
    assert_eq!(status, 200);
    edge.proc.expect_exit(0, WAIT).unwrap();
}

#[test]
fn an_admin_endpoint_beyond_loopback_is_refused_by_check() {
    let dir = Scratch::new("edge-admin-remote").unwrap();
    let config = dir.join("Caddyfile");
    std::fs::write(
        &config,
        format!(
            "{}http://plain.local {{\n\trespond \"x\"\n}}\n",
            globals(&dir, "\tadmin 0.0.0.0:2019\n")
        ),
    )
    .unwrap();
    let ran = run(EDGE, &["check", "--caddyfile", config.to_str().unwrap()]);
    assert_eq!(ran.code, 78, "{ran:?}");
    assert!(ran.stderr.contains("beyond loopback"), "{ran:?}");
}

/// A CA and a client certificate it signs, as PEM files `ca.crt`, `client.crt`,
/// `client.key` in `dir`.
fn client_ca(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();
    let issuer = Issuer::from_ca_cert_der(ca_cert.der(), &ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = client.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("client.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("client.key"), key.serialize_pem()).unwrap();
}

#[test]
fn client_auth_refuses_a_client_without_a_certificate_as_caddy_does_and_serves_one_with() {
    let certs = Scratch::new("edge-client-auth").unwrap();
    self_signed(certs.path(), "secure", &["secure.example.org"]);
    client_ca(certs.path());
    let both = Both::start_with(
        crate::support::Upstreams::new(),
        "secure.example.org {\n\ttls @CERTS@/secure.crt @CERTS@/secure.key {\n\t\tclient_auth {\n\t\t\tmode require_and_verify\n\t\t\ttrusted_ca_cert_file @CERTS@/ca.crt\n\t\t}\n\t}\n\trespond \"verified\"\n}\n",
        &[("@CERTS@", certs.path().display().to_string())],
    );
    let (edge, caddy) = both.https_ports;
    let ca = certs.join("secure.crt");
    for (who, port) in [("edge", edge), ("caddy", caddy)] {
        let without = get_trusting(&ca, "secure.example.org", port);
        assert_ne!(
            without.code, 0,
            "{who} served a client without a certificate: {without:?}"
        );
        let with = curl(&[
            "-sS".into(),
            "--max-time".into(),
            "20".into(),
            "--cacert".into(),
            ca.display().to_string(),
            "--cert".into(),
            certs.join("client.crt").display().to_string(),
            "--key".into(),
            certs.join("client.key").display().to_string(),
            "--resolve".into(),
            format!("secure.example.org:{port}:127.0.0.1"),
            format!("https://secure.example.org:{port}/"),
        ]);
        assert_eq!(
            (with.code, with.stdout.as_str()),
            (0, "verified"),
            "{who}: {with:?}"
        );
    }
    both.stop();
}

#[test]
fn a_client_auth_site_is_not_reached_through_another_names_handshake() {
    let dir = Scratch::new("edge-strict-sni").unwrap();
    self_signed(dir.path(), "secure", &["secure.example.org"]);
    client_ca(dir.path());
    let config = dir.join("Caddyfile");
    let d = dir.path().display().to_string();
    std::fs::write(
        &config,
        format!(
            "{}secure.example.org {{\n\ttls {d}/secure.crt {d}/secure.key {{\n\t\tclient_auth {{\n\t\t\ttrusted_ca_cert_file {d}/ca.crt\n\t\t}}\n\t}}\n\trespond \"secret\"\n}}\nother.local {{\n\ttls internal\n\trespond \"other\"\n}}\n",
            globals(&dir, "")
        ),
    )
    .unwrap();
    let edge = Edge::start(dir, config, "--caddyfile");
    let https = edge.port("https");
    // The handshake names other.local (no client certificate asked), the Host the other site.
    let got = curl(&[
        "-sk".into(),
        "-o".into(),
        "/dev/stderr".into(),
        "-w".into(),
        "%{http_code}".into(),
        "--resolve".into(),
        format!("other.local:{https}:127.0.0.1"),
        "-H".into(),
        "Host: secure.example.org".into(),
        format!("https://other.local:{https}/"),
    ]);
    assert_eq!(got.stdout, "421", "{got:?}");
    assert!(!got.stderr.contains("secret"), "{got:?}");
    edge.stop();
}
