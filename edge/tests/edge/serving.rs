//! Serving: the reference lab's Caddyfile over HTTP/1.1 and HTTP/2, WebSockets, 1 GiB both
//! ways in bounded memory, redirects, directives, passive health, reload and drain.

use std::io::Write;
use std::process::{Command, Stdio};

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Edge, Upstreams, WAIT, client_config, globals, json, lab_sites};

/// The reference lab's Caddyfile with `tls internal` added to each site and the upstreams
/// pointed at `web` and `git`, under test global options.
fn lab_caddyfile(dir_globals: &str, web: &str, git: &str) -> String {
    let lab = lab_sites();
    assert!(
        lab.contains("localhost:7001") && lab.contains("localhost:3000"),
        "{lab}"
    );
    let body = lab
        .replace("localhost:7001", web)
        .replace("localhost:3000", git)
        .replace(" {\n", " {\n\ttls internal\n");
    format!("{dir_globals}{body}")
}

fn start_lab(ups: &Upstreams) -> Edge {
    let web = ups.http("web").to_string();
    let git = ups.http("git").to_string();
    let dir = testkit::Scratch::new("edge").unwrap();
    let text = lab_caddyfile(&globals(&dir, ""), &web, &git);
    let config = dir.join("Caddyfile");
    std::fs::write(&config, text).unwrap();
    Edge::start(dir, config, "--caddyfile")
}

#[test]
fn the_lab_caddyfile_serves_both_sites_over_http1_and_http2() {
    let ups = Upstreams::new();
    let edge = start_lab(&ups);
    for (host, upstream) in [("lab.example.org", "web"), ("git.example.org", "git")] {
        for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
            let out = edge.curl(&[
                flag,
                "-w",
                "\n%{http_code} %{http_version}",
                "-H",
                "X-Forwarded-For: 6.6.6.6",
                &format!("https://{host}:@HTTPS@/echo?q=1"),
            ]);
            assert_eq!(out.code, 0, "{out:?}");
            let (body, tail) = out.stdout.rsplit_once('\n').unwrap();
            assert_eq!(tail, format!("200 {version}"));
            let seen = json(body);
            assert_eq!(seen["upstream"], upstream);
            assert_eq!(seen["path"], "/echo?q=1");
            let port = edge.port("https");
            assert_eq!(seen["host"], format!("{host}:{port}"), "Host is preserved");
            assert_eq!(seen["xfh"], format!("{host}:{port}"));
            assert_eq!(seen["xfp"], "https");
            assert_eq!(
                seen["xff"], "127.0.0.1",
                "a client's own X-Forwarded-For is not trusted"
            );
        }
    }
    // Access log: one JSON line per request on stdout.
    edge.stop();
    let lines: Vec<serde_json::Value> = edge.proc.stdout().lines().map(json).collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    let first = &lines[0];
    assert_eq!(first["method"], "GET");
    assert_eq!(first["host"], "lab.example.org");
    assert_eq!(first["path"], "/echo?q=1");
    assert_eq!(first["status"], 200);
    assert!(first["bytes"].as_u64().unwrap() > 0);
    assert!(first["duration_ms"].as_f64().is_some());
    assert_eq!(first["upstream"], ups_addr_of(&lines, 0));
    // The CA's files are private.
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    let pki = edge.dir.join("storage/pki/authorities/local");
    assert_eq!(mode(&pki.join("root.key")), 0o600);
    assert_eq!(mode(&pki.join("intermediate.key")), 0o600);
    assert_eq!(mode(&pki), 0o700);
    assert_eq!(mode(&edge.dir.join("storage")), 0o700);
}

fn ups_addr_of(lines: &[serde_json::Value], i: usize) -> serde_json::Value {
    let upstream = lines[i]["upstream"].as_str().unwrap();
    assert!(upstream.starts_with("127.0.0.1:"), "{upstream}");
    upstream.into()
}

#[test]
fn tls_1_2_and_tls_1_3_are_both_served() {
    let ups = Upstreams::new();
    let edge = start_lab(&ups);
    for (flags, version) in [
        (["--tlsv1.2", "--tls-max", "1.2"], "TLSv1.2"),
        (["--tlsv1.3", "--tls-max", "1.3"], "TLSv1.3"),
    ] {
        let mut args: Vec<&str> = flags.to_vec();
        args.extend(["-v", "https://git.example.org:@HTTPS@/v"]);
        let out = edge.curl(&args);
        assert_eq!(out.stdout, "git /v", "{out:?}");
        assert!(
            out.stderr
                .contains(&format!("SSL connection using {version}")),
            "{}",
            out.stderr
        );
    }
    edge.stop();
}

#[test]
fn plain_http_redirects_permanently_to_https_except_acme_challenges() {
    let ups = Upstreams::new();
    let edge = start_lab(&ups);
    let out = edge.curl(&["-i", "http://lab.example.org:@HTTP@/a/b?c=d"]);
    assert!(out.stdout.starts_with("HTTP/1.1 308"), "{out:?}");
    let https = edge.port("https");
    assert!(
        out.stdout.contains(&format!(
            "location: https://lab.example.org:{https}/a/b?c=d"
        )),
        "{out:?}"
    );
    let out = edge.curl(&[
        "-i",
        "http://lab.example.org:@HTTP@/.well-known/acme-challenge/tok",
    ]);
    assert!(out.stdout.starts_with("HTTP/1.1 404"), "{out:?}");
    let out = edge.curl(&["-i", "http://other.example.org:@HTTP@/"]);
    assert!(out.stdout.starts_with("HTTP/1.1 404"), "{out:?}");
    edge.stop();
}

async fn websocket(
    edge_port: u16,
    root: &std::path::Path,
    host: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", edge_port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(root, &[b"http/1.1"]))
        .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
        .await
        .unwrap();
    let (ws, response) =
        tokio_tungstenite::client_async(format!("wss://{host}:{edge_port}/ws"), tls)
            .await
            .unwrap();
    assert_eq!(response.status(), 101);
    ws
}

async fn echo(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>,
    text: &str,
) {
    ws.send(Message::text(text)).await.unwrap();
    let reply = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply, Message::text(text));
}

#[test]
fn a_websocket_echo_works_through_the_edge() {
    let ups = Upstreams::new();
    let ws_addr = ups.websocket().to_string();
    let dir = testkit::Scratch::new("edge").unwrap();
    let text = lab_caddyfile(&globals(&dir, ""), &ws_addr, &ws_addr);
    let config = dir.join("Caddyfile");
    std::fs::write(&config, text).unwrap();
    let edge = Edge::start(dir, config, "--caddyfile");
    let port = edge.port("https");
    let root = edge.root();
    ups.runtime.block_on(async {
        let mut ws = websocket(port, &root, "lab.example.org").await;
        for i in 0..10 {
            echo(&mut ws, &format!("message {i}")).await;
        }
        let big = "x".repeat(200_000);
        echo(&mut ws, &big).await;
        ws.close(None).await.unwrap();
    });
    edge.stop();
}

#[test]
fn reload_keeps_an_open_websocket_while_a_site_is_added() {
    let ups = Upstreams::new();
    let ws_addr = ups.websocket().to_string();
    let web = ups.http("new").to_string();
    let dir = testkit::Scratch::new("edge").unwrap();
    let text = lab_caddyfile(&globals(&dir, ""), &ws_addr, &ws_addr);
    let config = dir.join("Caddyfile");
    std::fs::write(&config, &text).unwrap();
    let edge = Edge::start(dir, config.clone(), "--caddyfile");
    let port = edge.port("https");
    let root = edge.root();
    let out = edge.curl(&[
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        "https://new.example.org:@HTTPS@/",
    ]);
    assert_ne!(out.code, 0, "the new site is not served yet: {out:?}");

    let mut ws = ups.runtime.block_on(async {
        let mut ws = websocket(port, &root, "lab.example.org").await;
        echo(&mut ws, "before reload").await;
        ws
    });
    std::fs::write(
        &config,
        format!("{text}\nnew.example.org {{\n\ttls internal\n\treverse_proxy {web}\n}}\n"),
    )
    .unwrap();
    edge.proc.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    edge.proc.wait_notification("RELOADING=1", WAIT).unwrap();
    edge.proc.wait_ready(WAIT).unwrap();
    ups.runtime.block_on(async {
        for i in 0..5 {
            echo(&mut ws, &format!("after reload {i}")).await;
        }
    });
    let out = edge.curl(&["https://new.example.org:@HTTPS@/hello"]);
    assert_eq!(out.stdout, "new /hello", "{out:?}");
    ups.runtime.block_on(async {
        echo(&mut ws, "still open").await;
        ws.close(None).await.unwrap();
    });
    edge.stop();
}

#[test]
fn a_bad_config_on_reload_keeps_the_old_one_serving() {
    let ups = Upstreams::new();
    let edge = start_lab(&ups);
    std::fs::write(&edge.config, "lab.example.org {\n\tacme_server\n}\n").unwrap();
    edge.proc.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    edge.proc.wait_notification("RELOADING=1", WAIT).unwrap();
    edge.proc.wait_ready(WAIT).unwrap();
    edge.proc.wait_stderr("new config rejected", WAIT).unwrap();
    let out = edge.curl(&["https://lab.example.org:@HTTPS@/x"]);
    assert_eq!(out.stdout, "web /x", "{out:?}");
    edge.stop();
}

#[test]
fn a_gigabyte_goes_up_and_down_with_the_edges_rss_under_40_mb() {
    const GIB: u64 = 1 << 30;
    let ups = Upstreams::new();
    let edge = start_lab(&ups);
    // Upload over HTTP/1.1, streamed from curl's stdin (chunked).
    let https = edge.port("https");
    let mut child = Command::new("curl")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args([
            "-sS",
            "--http1.1",
            "--max-time",
            "300",
            "-T",
            "-",
            "--cacert",
        ])
        .arg(edge.root())
        .arg("--resolve")
        .arg(format!("lab.example.org:{https}:127.0.0.1"))
        .arg(format!("https://lab.example.org:{https}/echo"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..1024 {
            stdin.write_all(&chunk).unwrap();
        }
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen = json(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(seen["bytes"], GIB, "the upstream got every byte");
    assert_eq!(seen["method"], "PUT");

    // Download over HTTP/2.
    let out = edge.curl(&[
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        &format!("https://lab.example.org:@HTTPS@/big?n={GIB}"),
    ]);
    assert_eq!(out.stdout, format!("200 {GIB}"), "{out:?}");

    let peak_kib = edge.vm_hwm_kib();
    eprintln!("edge peak RSS after 1 GiB each way: {peak_kib} KiB");
    assert!(
        peak_kib < 40 * 1024,
        "edge peak RSS {peak_kib} KiB is over 40 MB"
    );
    edge.stop();
}

#[test]
fn directives_redirect_authenticate_compress_and_set_headers() {
    let ups = Upstreams::new();
    let web = ups.http("web");
    let dir = testkit::Scratch::new("edge").unwrap();
    let hash = bcrypt::hash("open sesame", 4).unwrap();
    let text = format!(
        "{}app.local {{\n\tencode zstd gzip\n\theader -X-Upstream\n\theader /text Cache-Control \"max-age=60\"\n\tredir /old /text permanent\n\tredir /away https://elsewhere.example{{uri}}\n\tbasic_auth /admin* {{\n\t\talice {hash}\n\t}}\n\treverse_proxy {web}\n}}\n",
        globals(&dir, "")
    );
    let config = dir.join("Caddyfile");
    std::fs::write(&config, text).unwrap();
    let edge = Edge::start(dir, config, "--caddyfile");

    let out = edge.curl(&["-i", "https://app.local:@HTTPS@/old"]);
    assert!(out.stdout.starts_with("HTTP/2 301"), "{out:?}");
    assert!(out.stdout.contains("location: /text"), "{out:?}");
    let out = edge.curl(&["-i", "https://app.local:@HTTPS@/away?x=1"]);
    assert!(out.stdout.starts_with("HTTP/2 302"), "{out:?}");
    assert!(
        out.stdout
            .contains("location: https://elsewhere.example/away?x=1"),
        "{out:?}"
    );

    let out = edge.curl(&["-i", "https://app.local:@HTTPS@/admin/panel"]);
    assert!(out.stdout.starts_with("HTTP/2 401"), "{out:?}");
    assert!(
        out.stdout
            .contains("www-authenticate: Basic realm=\"restricted\""),
        "{out:?}"
    );
    let out = edge.curl(&[
        "-u",
        "alice:wrong",
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        "https://app.local:@HTTPS@/admin/panel",
    ]);
    assert_eq!(out.stdout, "401");
    let out = edge.curl(&[
        "-u",
        "alice:open sesame",
        "https://app.local:@HTTPS@/admin/panel",
    ]);
    assert_eq!(out.stdout, "web /admin/panel");

    for encoding in ["zstd", "gzip"] {
        let out = edge.curl(&[
            "-i",
            "-H",
            &format!("Accept-Encoding: {encoding}"),
            "-o",
            "/dev/null",
            "-D",
            "-",
            "https://app.local:@HTTPS@/text",
        ]);
        assert!(
            out.stdout
                .contains(&format!("content-encoding: {encoding}")),
            "{out:?}"
        );
        assert!(out.stdout.contains("cache-control: max-age=60"), "{out:?}");
        assert!(
            !out.stdout.contains("x-upstream"),
            "header -X-Upstream removes it: {out:?}"
        );
    }
    let plain = edge.curl(&["https://app.local:@HTTPS@/text"]);
    let decoded = edge.curl(&["--compressed", "https://app.local:@HTTPS@/text"]);
    assert_eq!(plain.stdout, decoded.stdout);
    assert_eq!(plain.stdout.len(), 33 * 256);
    edge.stop();
    let log = edge.proc.stdout();
    assert!(log.contains("\"user\":\"alice\""), "{log}");
}

#[test]
fn failed_upstreams_are_skipped_and_requests_reach_a_live_one() {
    let ups = Upstreams::new();
    let live = ups.http("live");
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = testkit::Scratch::new("edge").unwrap();
    let text = format!(
        "{}app.local {{\n\treverse_proxy {dead} {live}\n}}\n",
        globals(&dir, "")
    );
    let config = dir.join("Caddyfile");
    std::fs::write(&config, text).unwrap();
    let edge = Edge::start(dir, config, "--caddyfile");
    // The random policy picks the dead one first for about half of them (for none of 24 one
    // run in 2^24); each of those is retried on the live one.
    for _ in 0..24 {
        let out = edge.curl(&["https://app.local:@HTTPS@/x"]);
        assert_eq!(out.stdout, "live /x", "{out:?}");
    }
    // A request with a body goes to the live upstream too, the dead one being marked down.
    let out = edge.curl(&["--data-binary", "payload", "https://app.local:@HTTPS@/echo"]);
    let seen = json(&out.stdout);
    assert_eq!(
        (seen["upstream"].as_str(), seen["bytes"].as_u64()),
        (Some("live"), Some(7))
    );
    edge.proc.wait_stderr("upstream marked down", WAIT).unwrap();
    edge.stop();
}

#[test]
fn sigterm_lets_an_open_request_finish_then_exits_zero() {
    let ups = Upstreams::new();
    let edge = start_lab(&ups);
    let https = edge.port("https");
    let root = edge.root();
    let request = std::thread::spawn(move || {
        crate::support::curl(&[
            "-sS".into(),
            "--cacert".into(),
            root.display().to_string(),
            "--resolve".into(),
            format!("lab.example.org:{https}:127.0.0.1"),
            format!("https://lab.example.org:{https}/slow?ms=1500"),
        ])
    });
    ups.wait_slow_requests(1);
    edge.proc.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = request.join().unwrap();
    assert_eq!(out.stdout, "web slow", "{out:?}");
    edge.proc.expect_exit(0, WAIT).unwrap();
    assert!(edge.proc.notifications().iter().any(|n| n == "STOPPING=1"));
}
