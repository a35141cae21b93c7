//! TLS handshakes against Caddy: `local_certs`, and a site's `tls { protocols ciphers }`,
//! tried with clients limited to what each option should refuse or allow.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::differential::Both;
use crate::support::{Ran, WAIT, curl, run};

const NAME: &str = "secure.example.org";

/// `curl https://NAME:PORT/` with `extra` options, trusting `ca` (or nothing checked, if none).
fn get(port: u16, ca: Option<&Path>, extra: &[&str]) -> Ran {
    let mut args: Vec<String> = vec!["-sS".into(), "--max-time".into(), "20".into()];
    match ca {
        Some(ca) => {
            args.push("--cacert".into());
            args.push(ca.display().to_string());
        }
        None => args.push("-k".into()),
    }
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args.push("--resolve".into());
    args.push(format!("{NAME}:{port}:127.0.0.1"));
    args.push(format!("https://{NAME}:{port}/"));
    curl(&args)
}

/// The local root of a server's storage.
fn root(state: &Path) -> PathBuf {
    state.join("storage/pki/authorities/local/root.crt")
}

/// Waits until the server on `port` completes a TLS 1.3 handshake for NAME: Caddy issues
/// its certificates after it says it is ready.
fn wait_served(port: u16, who: &str) {
    let start = Instant::now();
    loop {
        let ran = get(port, None, &["--tlsv1.3"]);
        if ran.code == 0 {
            return;
        }
        assert!(start.elapsed() < WAIT, "{who} never served {NAME}: {ran:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The cipher a TLS 1.2 handshake offering `ciphers` (OpenSSL names) gets, if any.
fn tls12_cipher(port: u16, ciphers: &str) -> Option<String> {
    let ran = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            NAME,
            "-tls1_2",
            "-cipher",
            ciphers,
        ],
    );
    ran.stdout
        .lines()
        .find_map(|l| l.split_once("Cipher is ").map(|(_, c)| c.trim().to_owned()))
        .filter(|c| c != "(NONE)")
}

#[test]
fn local_certs_serves_each_site_from_its_own_local_root_as_caddy_does() {
    let both = Both::start(&format!(
        "{{\n\tlocal_certs\n}}\n{NAME} {{\n\trespond \"local\"\n}}\n"
    ));
    let (edge_state, caddy_state) = both.state_dirs();
    let (edge, caddy) = both.https_ports;
    for (who, port, state) in [("edge", edge, &edge_state), ("caddy", caddy, &caddy_state)] {
        wait_served(port, who);
        let ran = get(port, Some(&root(state)), &[]);
        assert_eq!(
            (ran.code, ran.stdout.as_str()),
            (0, "local"),
            "{who}: {ran:?}"
        );
    }
    // Each one's certificate chains to its own root only.
    let crossed = get(edge, Some(&root(&caddy_state)), &[]);
    assert_ne!(crossed.code, 0, "{crossed:?}");
    both.stop();
}

#[test]
fn protocols_tls1_3_refuses_a_tls1_2_only_client_on_both() {
    let both = Both::start(&format!(
        "{{\n\tlocal_certs\n}}\n{NAME} {{\n\ttls {{\n\t\tprotocols tls1.3\n\t}}\n\trespond \"ok\"\n}}\n"
    ));
    let (edge, caddy) = both.https_ports;
    for (who, port) in [("edge", edge), ("caddy", caddy)] {
        wait_served(port, who);
        let old = get(port, None, &["--tlsv1.2", "--tls-max", "1.2"]);
        assert_ne!(old.code, 0, "{who} let a TLS 1.2 client in: {old:?}");
        assert_eq!(get(port, None, &[]).stdout, "ok", "{who}");
    }
    both.stop();
}

#[test]
fn a_cipher_list_restricts_what_a_tls1_2_client_negotiates_on_both() {
    let both = Both::start(&format!(
        "{{\n\tlocal_certs\n}}\n{NAME} {{\n\ttls {{\n\t\tciphers TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384\n\t}}\n\trespond \"ok\"\n}}\n"
    ));
    let (edge, caddy) = both.https_ports;
    for (who, port) in [("edge", edge), ("caddy", caddy)] {
        wait_served(port, who);
        assert_eq!(
            tls12_cipher(
                port,
                "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305"
            ),
            None,
            "{who} negotiated a suite outside its list"
        );
        assert_eq!(
            tls12_cipher(
                port,
                "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"
            )
            .as_deref(),
            Some("ECDHE-ECDSA-AES256-GCM-SHA384"),
            "{who}"
        );
    }
    both.stop();
}
