//! The command line as a user meets it: `tunnel check`, the side chosen from the file's table,
//! a distinct exit code and a culprit for each kind of bad input, and tokens read from
//! `token_file` and from systemd credentials rather than the config.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;

use common::*;
use testkit::{Proc, ProcBuilder, Scratch};

const LAB_SERVER: &str = include_str!("../../examples/tunnel/server.toml");
const LAB_CLIENT: &str = include_str!("../../examples/tunnel/client.toml");

/// Runs `tunnel ARGS` to its end and returns it.
fn finished(args: &[&str], code: i32) -> Proc {
    let proc = ProcBuilder::new(TUNNEL).args(args).spawn().unwrap();
    proc.expect_exit(code, WAIT).unwrap();
    proc
}

#[test]
fn check_prints_what_the_lab_configs_set_up_and_no_token() {
    let dir = Scratch::new("cli").unwrap();
    let server = write(&dir, "server.toml", LAB_SERVER);
    let out = finished(&["check", "-c", server.to_str().unwrap()], 0).stdout();
    assert!(
        out.contains("server, control port 0.0.0.0:7000, 4 services"),
        "{out}"
    );
    assert!(out.contains("  ssh on 0.0.0.0:3389"), "{out}");
    assert!(out.contains("  web on 127.0.0.1:7001"), "{out}");
    let client = write(&dir, "client.toml", LAB_CLIENT);
    let out = finished(&["check", "-c", client.to_str().unwrap()], 0).stdout();
    assert!(
        out.contains("client of lab.example.org:7000, 4 services"),
        "{out}"
    );
    assert!(out.contains("  gitssh to 127.0.0.1:222"), "{out}");
    assert!(!out.contains("change-me"), "a token was printed: {out}");
}

#[test]
fn check_marks_udp_services_and_names_tcp_only_keys_on_them() {
    let dir = Scratch::new("cli").unwrap();
    let udp = write(
        &dir,
        "udp.toml",
        "[server]\nbind_addr = \"0.0.0.0:7000\"\ndefault_token = \"t-long-enough\"\n\
         [server.services.wg]\ntype = \"udp\"\nbind_addr = \"0.0.0.0:51820\"\n",
    );
    let out = finished(&["check", "-c", udp.to_str().unwrap()], 0).stdout();
    assert!(out.contains("  wg on 0.0.0.0:51820 (udp)\n"), "{out}");
    let limited = write(
        &dir,
        "limited.toml",
        "[server]\nbind_addr = \"0.0.0.0:7000\"\ndefault_token = \"t-long-enough\"\n\
         [server.services.wg]\ntype = \"udp\"\nbind_addr = \"0.0.0.0:51820\"\nmax_connections = 5\n",
    );
    let err = finished(&["check", "-c", limited.to_str().unwrap()], 78).stderr();
    assert!(err.contains("server.services.wg.max_connections"), "{err}");
}

#[test]
fn bad_configs_and_arguments_exit_with_distinct_codes_naming_the_culprit() {
    let dir = Scratch::new("cli").unwrap();

    // A typo: 78, with the file, line and key.
    let typo = write(
        &dir,
        "typo.toml",
        "[server]\nbind_addr = \"127.0.0.1:0\"\ndefault_tokn = \"x\"\n",
    );
    let err = finished(&["server", "-c", typo.to_str().unwrap()], 78).stderr();
    assert!(err.contains("typo.toml:3"), "{err}");
    assert!(err.contains("default_tokn"), "{err}");

    // A TLS server without its certificate: 78, naming the key, before anything is bound.
    let tls = write(
        &dir,
        "tls.toml",
        &format!(
            "{}[server.transport]\ntype = \"tls\"\n",
            server_config("", &[("echo", "token-t1")])
        ),
    );
    let err = finished(&["server", "-c", tls.to_str().unwrap()], 78).stderr();
    assert!(err.contains("server.transport.tls.pkcs12"), "{err}");

    // A limit of no connections: 78, naming the key.
    let zero = write(
        &dir,
        "zero.toml",
        &format!(
            "{}max_connections = 0\n",
            server_config("", &[("echo", "token-t1")])
        ),
    );
    let err = finished(&["check", "-c", zero.to_str().unwrap()], 78).stderr();
    assert!(
        err.contains("server.services.echo.max_connections"),
        "{err}"
    );

    // The wrong side for the file: 78.
    let client_only = write(
        &dir,
        "client.toml",
        &client_config("127.0.0.1:7000".parse().unwrap(), "", &[]),
    );
    let err = finished(&["server", "-c", client_only.to_str().unwrap()], 78).stderr();
    assert!(err.contains("no [server] table"), "{err}");

    // No such file: 66, naming it.
    let missing = dir.join("missing.toml");
    let err = finished(&["server", "-c", missing.to_str().unwrap()], 66).stderr();
    assert!(err.contains("missing.toml"), "{err}");

    // No file at all, or an unknown flag: 64.
    finished(&["server"], 64);
    finished(&["server", "--frobnicate"], 64);

    // A service port someone else holds: 69, naming the service and the address.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let busy = write(
        &dir,
        "busy.toml",
        &format!(
            "[server]\nbind_addr = \"127.0.0.1:0\"\ndefault_token = \"t-long-enough\"\n\
             [server.services.web]\nbind_addr = \"{addr}\"\n"
        ),
    );
    let err = finished(&["server", "-c", busy.to_str().unwrap()], 69).stderr();
    assert!(err.contains("service web"), "{err}");
    assert!(err.contains(&addr.to_string()), "{err}");
}

#[test]
fn tokens_come_from_systemd_credentials_and_token_files_and_never_reach_the_log() {
    const TOKEN: &str = "Cr3dential-T0ken-9f1c";
    let dir = Scratch::new("cli").unwrap();
    // The server's token is a systemd credential named after its key.
    let creds = dir.join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("server.services.echo.token"), TOKEN).unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        "[server]\nbind_addr = \"127.0.0.1:0\"\n\
         [server.services.echo]\nbind_addr = \"127.0.0.1:0\"\n",
    );
    let server = tunnel(&["server"], &server_toml)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .spawn()
        .unwrap();
    server.wait_ready(WAIT).unwrap();
    // The client's is in a file (as an editor saves it, with a newline), and the side comes
    // from the file's [client] table.
    let token_file = dir.join("echo.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let client_toml = write(
        &dir,
        "client.toml",
        &format!(
            "[client]\nremote_addr = \"{}\"\n\
             [client.services.echo]\nlocal_addr = \"{}\"\ntoken_file = \"{}\"\n",
            control_addr(&server),
            echo_service(),
            token_file.display()
        ),
    );
    let client = tunnel(&[], &client_toml).spawn().unwrap();
    client.wait_ready(WAIT).unwrap();
    echo_through(service_addr(&server, "echo"), &payload(100_000));
    for proc in [&server, &client] {
        assert!(!proc.stderr().contains(TOKEN), "the token reached the log");
    }
}

#[test]
fn a_noise_private_key_comes_from_a_credential_and_labkit_talks_noise_to_itself() {
    let dir = Scratch::new("cli").unwrap();
    let genkey = finished(&["genkey"], 0).stdout();
    let lines: Vec<&str> = genkey.lines().collect();
    let (private, public) = (lines[1], lines[4]);
    let creds = dir.join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(
        creds.join("server.transport.noise.local_private_key"),
        private,
    )
    .unwrap();
    let server_toml = write(
        &dir,
        "server.toml",
        &format!(
            "{}[server.transport]\ntype = \"noise\"\n",
            server_config("", &[("echo", "token-t1")])
        ),
    );
    let server = tunnel(&["server"], &server_toml)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .spawn()
        .unwrap();
    server.wait_ready(WAIT).unwrap();
    let client_toml = write(
        &dir,
        "client.toml",
        &format!(
            "{}[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n",
            client_config(
                control_addr(&server),
                "",
                &[("echo", "token-t1", echo_service())]
            )
        ),
    );
    let client = client(&client_toml);
    echo_through(service_addr(&server, "echo"), &payload(2_000_000));
    for proc in [&server, &client] {
        assert!(
            !proc.stderr().contains(private),
            "the private key reached the log"
        );
    }
}

#[test]
fn empty_or_short_tokens_that_make_the_proof_guessable_are_refused_with_exit_78() {
    let dir = Scratch::new("cli").unwrap();
    let empty_file = dir.join("empty.token");
    std::fs::write(&empty_file, "\n").unwrap();
    std::fs::set_permissions(&empty_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let creds = dir.join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("server.services.ssh.token"), "").unwrap();
    let service = "[server.services.ssh]\nbind_addr = \"127.0.0.1:0\"\n";
    for (name, table, service_keys, key) in [
        (
            "file.toml",
            String::new(),
            format!("token_file = \"{}\"\n", empty_file.display()),
            "server.services.ssh.token_file",
        ),
        (
            "short.toml",
            String::new(),
            "token = \"hunter2\"\n".to_owned(),
            "server.services.ssh.token",
        ),
        (
            "default.toml",
            "default_token = \"\"\n".to_owned(),
            String::new(),
            "server.default_token",
        ),
        (
            "credential.toml",
            String::new(),
            String::new(),
            "server.services.ssh.token",
        ),
    ] {
        let config = write(
            &dir,
            name,
            &format!("[server]\nbind_addr = \"127.0.0.1:0\"\n{table}{service}{service_keys}"),
        );
        for command in ["check", "server"] {
            let proc = ProcBuilder::new(TUNNEL)
                .args([command, "-c", config.to_str().unwrap()])
                .env("CREDENTIALS_DIRECTORY", &creds)
                .spawn()
                .unwrap();
            proc.expect_exit(78, WAIT).unwrap();
            let err = proc.stderr();
            assert!(err.contains(&format!("key \"{key}\"")), "{name}: {err}");
            assert!(err.contains("at least 8 bytes"), "{name}: {err}");
            assert!(
                !err.contains("hunter2"),
                "{name}: the token was shown: {err}"
            );
        }
    }
    // The lab's own tokens ("change-me-ssh") pass.
    let lab = write(&dir, "lab.toml", LAB_SERVER);
    finished(&["check", "-c", lab.to_str().unwrap()], 0);
}

#[test]
fn every_tunnel_example_checks() {
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tunnel");
    let mut checked = 0;
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        let ran = ProcBuilder::new(TUNNEL)
            .args(["check", "-c", path.to_str().unwrap()])
            .spawn()
            .unwrap();
        ran.expect_exit(0, WAIT)
            .unwrap_or_else(|e| panic!("{}: {e}: {}", path.display(), ran.stderr()));
        checked += 1;
    }
    assert!(checked >= 2, "the server and client examples are there");
}

#[test]
fn check_refuses_a_bad_declared_port_range_with_its_file_line_and_exit_78() {
    let dir = Scratch::new("cli").unwrap();
    let bad = write(
        &dir,
        "declared.toml",
        "[server]\nbind_addr = \"0.0.0.0:7000\"\n[server.declared]\nports = [2222, \"30000-20000\"]\n\
         [server.declared.clients.home]\ntoken = \"change-me-home\"\n",
    );
    let err = finished(&["check", "-c", bad.to_str().unwrap()], 78).stderr();
    assert!(err.contains("declared.toml:4:"), "{err}");
    assert!(
        err.contains("\"30000-20000\" ends before it starts"),
        "{err}"
    );
    let unbacked = write(
        &dir,
        "client.toml",
        "[client]\nremote_addr = \"a:1\"\n[client.services.web]\nlocal_addr = \"127.0.0.1:80\"\n\
         bind_port = 8080\ntoken = \"change-me-web\"\n",
    );
    let err = finished(&["check", "-c", unbacked.to_str().unwrap()], 78).stderr();
    assert!(
        err.contains("key \"client.services.web.bind_port\""),
        "{err}"
    );
    assert!(err.contains("needs a [client.declare] table"), "{err}");
    assert!(!err.contains("change-me-web"), "{err}");
}
