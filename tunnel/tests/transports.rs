//! The TLS and WebSocket transports against the real rathole 0.5.0 (both ways), refusals of
//! untrusted certificates, and clients reaching their server through real proxies: tinyproxy
//! (HTTP CONNECT) and Dante (SOCKS5), Debian packages that scripts/test installs.
//!
//! Certificates come from rcgen (a test CA and a leaf for `localhost` and 127.0.0.1); PKCS#12
//! files from the `openssl pkcs12 -export` command, as a rathole user makes them.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::*;
use testkit::ports::{free_port, retry_on_port_clash};
use testkit::{Proc, ProcBuilder, Scratch};

const P12_PASSWORD: &str = "pkcs12-password";

/// A test CA and a server certificate it signed, as PEM files and a PKCS#12 file.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    p12: PathBuf,
}

fn pki(dir: &Scratch, name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("labkit test CA {name}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let pki = Pki {
        ca: write(dir, &format!("{name}-ca.pem"), &ca.pem()),
        cert: write(dir, &format!("{name}-cert.pem"), &cert.pem()),
        key: write(dir, &format!("{name}-key.pem"), &key.serialize_pem()),
        p12: dir.join(format!("{name}.p12")),
    };
    let pass = write(dir, &format!("{name}-p12-pass"), P12_PASSWORD);
    let openssl = ProcBuilder::new("openssl")
        .args(["pkcs12", "-export", "-in"])
        .arg(&pki.cert)
        .arg("-inkey")
        .arg(&pki.key)
        .arg("-certfile")
        .arg(&pki.ca)
        .arg("-out")
        .arg(&pki.p12)
        .arg("-passout")
        .arg(format!("file:{}", pass.display()))
        .spawn()
        .unwrap();
    openssl.expect_exit(0, WAIT).unwrap();
    pki
}

fn tls_server(identity: &str) -> String {
    format!("[server.transport]\ntype = \"tls\"\n[server.transport.tls]\n{identity}")
}

fn pkcs12_identity(pki: &Pki) -> String {
    format!(
        "pkcs12 = \"{}\"\npkcs12_password = \"{P12_PASSWORD}\"\n",
        pki.p12.display()
    )
}

fn tls_client(ca: &Path) -> String {
    format!(
        "[client.transport]\ntype = \"tls\"\n[client.transport.tls]\n\
         trusted_root = \"{}\"\nhostname = \"localhost\"\n",
        ca.display()
    )
}

/// A labkit client of `control` with the service `echo`, ready once its control channel is.
fn labkit_client(dir: &Scratch, control: SocketAddr, extra: &str) -> Proc {
    let config = client_config(control, extra, &[("echo", "token-t1", echo_service())]);
    client(&write(dir, "client.toml", &config))
}

/// A labkit server with the service `echo` and `extra` config.
fn labkit_server(dir: &Scratch, extra: &str) -> Proc {
    server(&write(
        dir,
        "server.toml",
        &server_config(extra, &[("echo", "token-t1")]),
    ))
}

/// A rathole client of `control` with the service `echo` and `extra` config.
fn rathole_client(dir: &Scratch, control: SocketAddr, extra: &str) -> Proc {
    let config = client_config(control, extra, &[("echo", "token-t1", echo_service())]);
    common::rathole_client(&write(dir, "rathole-client.toml", &config))
}

/// Sends `payload` to the echo service at `addr` and reads it all back before closing:
/// no half-close, which a WebSocket close cannot carry.
fn echo_whole(addr: SocketAddr, payload: &[u8]) {
    let mut stream = visit(addr);
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let payload = payload.to_vec();
        std::thread::spawn(move || stream.write_all(&payload).unwrap())
    };
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == payload, "echoed bytes through {addr} differ");
}

fn echo_some(service: SocketAddr) {
    for _ in 0..5 {
        echo_whole(service, &payload(100_000));
    }
    echo_whole(service, &payload(3_000_000));
}

#[test]
fn a_labkit_tls_client_works_with_a_rathole_tls_server_on_an_openssl_pkcs12_file() {
    let dir = Scratch::new("tls").unwrap();
    let pki = pki(&dir, "lab");
    let (rathole, control, service) =
        rathole_server(&dir, "token-t1", &tls_server(&pkcs12_identity(&pki)));
    let _client = labkit_client(&dir, control, &tls_client(&pki.ca));
    rathole
        .wait_output(&format!("Listening at {service}"), WAIT)
        .unwrap();
    echo_some(service);
    echo_through(service, &payload(1_000_000));
}

#[test]
fn a_rathole_tls_client_works_with_a_labkit_tls_server_on_a_pkcs12_file() {
    let dir = Scratch::new("tls").unwrap();
    let pki = pki(&dir, "lab");
    // The password from a file, as labkit allows beside rathole's inline key.
    let pass = write(&dir, "p12-password", &format!("{P12_PASSWORD}\n"));
    let server = labkit_server(
        &dir,
        &tls_server(&format!(
            "pkcs12 = \"{}\"\npkcs12_password_file = \"{}\"\n",
            pki.p12.display(),
            pass.display()
        )),
    );
    let _rathole = rathole_client(&dir, control_addr(&server), &tls_client(&pki.ca));
    server
        .wait_stderr("control channel open service=echo ", WAIT)
        .unwrap();
    let service = service_addr(&server, "echo");
    echo_some(service);
    echo_through(service, &payload(1_000_000));
    assert!(!server.stderr().contains(P12_PASSWORD));
}

#[test]
fn labkit_tls_sides_work_together_on_pem_files() {
    let dir = Scratch::new("tls").unwrap();
    let pki = pki(&dir, "lab");
    let server = labkit_server(
        &dir,
        &tls_server(&format!(
            "cert = \"{}\"\nkey = \"{}\"\n",
            pki.cert.display(),
            pki.key.display()
        )),
    );
    let _client = labkit_client(&dir, control_addr(&server), &tls_client(&pki.ca));
    let service = service_addr(&server, "echo");
    echo_some(service);
    echo_through(service, &payload(1_000_000));
}

#[test]
fn an_untrusted_tls_certificate_is_refused_with_a_log_line_and_serves_nothing() {
    let dir = Scratch::new("tls").unwrap();
    let real = pki(&dir, "real");
    let other = pki(&dir, "other");
    let server = labkit_server(
        &dir,
        &tls_server(&format!(
            "cert = \"{}\"\nkey = \"{}\"\n",
            real.cert.display(),
            real.key.display()
        )),
    );
    let control = control_addr(&server);
    // A labkit client trusting another CA refuses the server and says why.
    let config = client_config(
        control,
        &tls_client(&other.ca),
        &[("echo", "token-t1", echo_service())],
    );
    let client = tunnel(&["client"], &write(&dir, "client.toml", &config))
        .spawn()
        .unwrap();
    let line = client
        .wait_stderr("could not open the control channel", WAIT)
        .unwrap();
    assert!(line.contains("TLS: handshake failed"), "{line}");
    assert!(line.contains("UnknownIssuer"), "{line}");
    let line = server
        .wait_stderr("connection refused peer=127.0.0.1:", WAIT)
        .unwrap();
    assert!(line.contains("TLS: handshake failed"), "{line}");
    // A rathole client trusting the other CA too.
    let _rathole = rathole_client(&dir, control, &tls_client(&other.ca));
    wait_count(&server, "connection refused peer=127.0.0.1:", 2);
    // No control channel opened, so the service's visitors are turned away.
    let mut visitor = visit(service_addr(&server, "echo"));
    assert!(closed_by_peer(&mut visitor, WAIT));
    assert!(!server.stderr().contains("control channel open"));
}

fn websocket(side: &str, tls: bool) -> String {
    format!("[{side}.transport]\ntype = \"websocket\"\n[{side}.transport.websocket]\ntls = {tls}\n")
}

#[test]
fn a_labkit_websocket_client_works_with_a_rathole_websocket_server() {
    let dir = Scratch::new("ws").unwrap();
    let (rathole, control, service) = rathole_server(&dir, "token-t1", &websocket("server", false));
    let _client = labkit_client(&dir, control, &websocket("client", false));
    rathole
        .wait_output(&format!("Listening at {service}"), WAIT)
        .unwrap();
    echo_some(service);
}

#[test]
fn a_rathole_websocket_client_works_with_a_labkit_websocket_server_over_tls() {
    let dir = Scratch::new("ws").unwrap();
    let pki = pki(&dir, "lab");
    let server_extra = format!(
        "{}[server.transport.tls]\n{}",
        websocket("server", true),
        pkcs12_identity(&pki)
    );
    let server = labkit_server(&dir, &server_extra);
    let client_extra = format!(
        "{}[client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n",
        websocket("client", true),
        pki.ca.display()
    );
    let _rathole = rathole_client(&dir, control_addr(&server), &client_extra);
    server
        .wait_stderr("control channel open service=echo ", WAIT)
        .unwrap();
    echo_some(service_addr(&server, "echo"));
}

#[test]
fn a_labkit_websocket_client_over_tls_works_with_a_rathole_server_over_tls() {
    let dir = Scratch::new("ws").unwrap();
    let pki = pki(&dir, "lab");
    let server_extra = format!(
        "{}[server.transport.tls]\n{}",
        websocket("server", true),
        pkcs12_identity(&pki)
    );
    let (rathole, control, service) = rathole_server(&dir, "token-t1", &server_extra);
    let client_extra = format!(
        "{}[client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n",
        websocket("client", true),
        pki.ca.display()
    );
    let _client = labkit_client(&dir, control, &client_extra);
    rathole
        .wait_output(&format!("Listening at {service}"), WAIT)
        .unwrap();
    echo_some(service);
}

#[test]
fn a_rathole_websocket_client_works_with_a_labkit_websocket_server() {
    let dir = Scratch::new("ws").unwrap();
    let server = labkit_server(&dir, &websocket("server", false));
    let _rathole = rathole_client(&dir, control_addr(&server), &websocket("client", false));
    server
        .wait_stderr("control channel open service=echo ", WAIT)
        .unwrap();
    echo_some(service_addr(&server, "echo"));
}

/// A proxy child process, stopped with SIGTERM (so it takes its workers along) when dropped.
struct ProxyProc {
    proc: Proc,
    addr: SocketAddr,
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        let _ = self.proc.stop(WAIT);
    }
}

/// tinyproxy on a free loopback port, asking for `user`/`password`.
fn tinyproxy(dir: &Scratch, user: &str, password: &str) -> ProxyProc {
    let (proc, addr) = retry_on_port_clash(|_| {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = write(
            dir,
            "tinyproxy.conf",
            &format!(
                "Port {}\nListen 127.0.0.1\nTimeout 60\nLogLevel Info\nMaxClients 50\n\
                 Allow 127.0.0.1\nBasicAuth {user} {password}\n",
                addr.port()
            ),
        );
        let proc = ProcBuilder::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&config)
            .spawn()?;
        proc.wait_output("Accepting connections", WAIT)?;
        Ok((proc, addr))
    })
    .unwrap();
    ProxyProc { proc, addr }
}

/// Dante's SOCKS5 server on a free loopback port, without authentication.
fn dante(dir: &Scratch) -> ProxyProc {
    let (proc, addr) = retry_on_port_clash(|_| {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = write(
            dir,
            "danted.conf",
            &format!(
                "logoutput: stderr\ninternal: 127.0.0.1 port = {}\nexternal: 127.0.0.1\n\
                 socksmethod: none\nclientmethod: none\n\
                 user.privileged: root\nuser.unprivileged: nobody\n\
                 client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 log: connect error }}\n\
                 socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 log: connect error }}\n",
                addr.port()
            ),
        );
        let proc = ProcBuilder::new("danted")
            .arg("-f")
            .arg(&config)
            .args(["-N", "1"])
            .spawn()?;
        proc.wait_output("running", WAIT)?;
        Ok((proc, addr))
    })
    .unwrap();
    ProxyProc { proc, addr }
}

fn proxy(url: &str) -> String {
    format!("[client.transport.tcp]\nproxy = \"{url}\"\n")
}

#[test]
fn a_client_reaches_its_server_through_an_http_connect_proxy_with_a_password() {
    let dir = Scratch::new("proxy").unwrap();
    let tinyproxy = tinyproxy(&dir, "alice", "pr0xy-secret");
    let server = labkit_server(&dir, "");
    let control = control_addr(&server);
    let client = labkit_client(
        &dir,
        control,
        &proxy(&format!("http://alice:pr0xy-secret@{}", tinyproxy.addr)),
    );
    // tinyproxy closes both ways when one side half-closes, so no echo_through here.
    echo_some(service_addr(&server, "echo"));
    // The control channel and the data channel both went through the proxy.
    // tinyproxy logs to stdout, a line per request, before it relays.
    let asked = format!("CONNECT {control} HTTP/1.1");
    assert!(
        tinyproxy.proc.stdout().matches(&asked).count() >= 2,
        "{}",
        tinyproxy.proc.stdout()
    );
    assert!(!client.stderr().contains("pr0xy-secret"));
}

#[test]
fn a_wrong_proxy_password_is_a_clear_log_line_without_the_password() {
    let dir = Scratch::new("proxy").unwrap();
    let tinyproxy = tinyproxy(&dir, "alice", "pr0xy-secret");
    let server = labkit_server(&dir, "");
    let config = client_config(
        control_addr(&server),
        &proxy(&format!("http://alice:wrong-secret@{}", tinyproxy.addr)),
        &[("echo", "token-t1", echo_service())],
    );
    let client = tunnel(&["client"], &write(&dir, "client.toml", &config))
        .spawn()
        .unwrap();
    let line = client
        .wait_stderr("could not open the control channel", WAIT)
        .unwrap();
    assert!(
        line.contains(&format!("proxy {}", tinyproxy.addr)),
        "{line}"
    );
    assert!(line.contains("the proxy wants authentication"), "{line}");
    assert!(!client.stderr().contains("wrong-secret"));
    assert!(!server.stderr().contains("control channel open"));
}

#[test]
fn a_tls_client_reaches_its_server_through_a_socks5_proxy() {
    let dir = Scratch::new("proxy").unwrap();
    let dante = dante(&dir);
    let pki = pki(&dir, "lab");
    let server = labkit_server(&dir, &tls_server(&pkcs12_identity(&pki)));
    let extra = format!(
        "{}{}",
        tls_client(&pki.ca),
        proxy(&format!("socks5://{}", dante.addr))
    );
    let _client = labkit_client(&dir, control_addr(&server), &extra);
    let service = service_addr(&server, "echo");
    echo_through(service, &payload(1_000_000));
    // Dante logs each connection it accepts: the control channel and a data channel at least.
    wait_count(&dante.proc, "tcp/accept [", 2);
}
