//! Real client IPs: `reverse_proxy`'s `trusted_proxies` against Caddy 2.6 (a second loopback
//! address, 127.0.0.2, is the second peer), `servers { trusted_proxies }` as Caddy 2.7+ defines
//! it (Debian's Caddy 2.6.2 refuses the option, so those tests hold the edge to Caddy's
//! documented values), and PROXY protocol headers before HTTP and before TLS, sent by the test
//! as the tunnel's `proxy_protocol = "v2"` writes them.

use std::io::{Read, Write};
use std::net::TcpStream;

use testkit::Scratch;

use crate::differential::{Both, Req, connect_from};
use crate::support::{Edge, Upstreams, WAIT, globals};

/// The v2 header the tunnel sends for a TCP4 visitor `src:sport` reaching `dst:dport`.
fn proxy_v2(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x21, 0x11, 0, 12]);
    out.extend_from_slice(&src);
    out.extend_from_slice(&dst);
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out
}

/// Writes `prefix` then a GET of `path` for plain.local on a new connection from
/// `source`, and returns everything that came back.
fn raw_get(source: &str, port: u16, prefix: &[u8], path: &str) -> String {
    let mut stream = connect_from(source.parse().unwrap(), port);
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut bytes = prefix.to_vec();
    bytes.extend_from_slice(
        format!("GET {path} HTTP/1.1\r\nHost: plain.local\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let _ = stream.write_all(&bytes);
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

/// The body of an HTTP/1.1 answer that is not chunked.
fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// The site's access log lines (JSON, Caddy's shape), as the edge wrote them so far.
fn access_lines(edge: &Edge) -> Vec<serde_json::Value> {
    edge.proc
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["msg"] == "handled request")
        .collect()
}

#[test]
fn reverse_proxy_trusted_proxies_keep_or_replace_forwarded_headers_as_caddy() {
    let both = Both::start(
        "http://plain.local {\n\t@second remote_ip 127.0.0.2\n\thandle /who {\n\t\trespond \"{remote_host}\"\n\t}\n\thandle /match {\n\t\trespond @second \"second\"\n\t\trespond \"other\"\n\t}\n\thandle {\n\t\treverse_proxy @ECHO@ {\n\t\t\ttrusted_proxies 127.0.0.2\n\t\t}\n\t}\n}\n",
    );
    let spoofs: [&[(&str, &str)]; 5] = [
        &[],
        &[("X-Forwarded-For", "203.0.113.9")],
        &[
            ("X-Forwarded-For", "203.0.113.9, 10.0.0.1"),
            ("X-Forwarded-For", "192.0.2.1"),
        ],
        &[
            ("X-Forwarded-For", "not an address"),
            ("X-Forwarded-Proto", "https"),
        ],
        &[
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-For", ""),
        ],
    ];
    for source in ["127.0.0.1", "127.0.0.2"] {
        for headers in spoofs {
            for path in ["/who", "/match", "/proxied"] {
                let mut req = Req::get(path).from(source);
                for (name, value) in headers {
                    req = req.header(name, value);
                }
                both.request(&req).caddy_status(200).assert_same(&[]);
            }
        }
    }
    // What the comparison rests on: the trusted peer's list goes on, the other's does not.
    let port = both.edge_port();
    let trusted = Req::get("/p")
        .from("127.0.0.2")
        .header("X-Forwarded-For", "203.0.113.9");
    assert!(
        trusted
            .send(port)
            .text()
            .contains("x-forwarded-for: 203.0.113.9, 127.0.0.2\n"),
        "{}",
        trusted.send(port).text()
    );
    let spoofed = Req::get("/p").header("X-Forwarded-For", "203.0.113.9");
    assert!(
        spoofed
            .send(port)
            .text()
            .contains("x-forwarded-for: 127.0.0.1\n"),
        "{}",
        spoofed.send(port).text()
    );
    both.stop();
}

/// Starts the edge on `servers` options and a site answering who the client is.
fn start_edge(servers: &str, echo: std::net::SocketAddr) -> Edge {
    let dir = Scratch::new("edge-client-ip").unwrap();
    let config = dir.join("Caddyfile");
    std::fs::write(
        &config,
        format!(
            "{}http://plain.local, https://app.local {{\n\ttls internal\n\tlog {{\n\t\toutput stdout\n\t\tformat json\n\t}}\n\t@client client_ip 203.0.113.0/24 198.51.100.0/24\n\t@remote remote_ip 203.0.113.0/24 198.51.100.0/24\n\thandle /who {{\n\t\trespond \"{{client_ip}}|{{remote_host}}\"\n\t}}\n\thandle /client {{\n\t\trespond @client \"matched\"\n\t\trespond \"not matched\"\n\t}}\n\thandle /remote {{\n\t\trespond @remote \"matched\"\n\t\trespond \"not matched\"\n\t}}\n\thandle {{\n\t\treverse_proxy {echo} {{\n\t\t\tlb_policy client_ip_hash\n\t\t}}\n\t}}\n}}\n",
            globals(&dir, &format!("\tservers {{\n{servers}\t}}\n"))
        ),
    )
    .unwrap();
    Edge::start(dir, config, "--caddyfile")
}

#[test]
fn behind_a_trusted_proxy_the_client_it_names_is_matched_shown_logged_and_forwarded() {
    let upstreams = Upstreams::new();
    let edge = start_edge(
        "\t\ttrusted_proxies static 127.0.0.2\n\t\tclient_ip_headers X-Real-IP X-Forwarded-For\n",
        upstreams.echo(),
    );
    let port = edge.port("http");
    let from_proxy = |path: &str| {
        Req::get(path)
            .from("127.0.0.2")
            .header("X-Forwarded-For", "203.0.113.9, 10.9.9.9")
            .send(port)
            .text()
    };
    // Caddy 2.7+: {client_ip} is the leftmost address the trusted peer's header gives, the
    // client_ip matcher sees it, remote_ip and {remote_host} stay on the peer.
    assert_eq!(from_proxy("/who"), "203.0.113.9|127.0.0.2");
    assert_eq!(from_proxy("/client"), "matched");
    assert_eq!(from_proxy("/remote"), "not matched");
    assert!(
        from_proxy("/up").contains("x-forwarded-for: 203.0.113.9, 10.9.9.9, 127.0.0.2\n"),
        "{}",
        from_proxy("/up")
    );
    // X-Real-IP is listed first, so it wins.
    let real_ip = Req::get("/who")
        .from("127.0.0.2")
        .header("X-Forwarded-For", "203.0.113.9")
        .header("X-Real-IP", "198.51.100.4")
        .send(port)
        .text();
    assert_eq!(real_ip, "198.51.100.4|127.0.0.2");
    // The same headers from a peer that is not trusted are ignored, and replaced upstream.
    let spoofed = |path: &str| {
        Req::get(path)
            .header("X-Forwarded-For", "203.0.113.9")
            .header("X-Real-IP", "198.51.100.4")
            .send(port)
            .text()
    };
    assert_eq!(spoofed("/who"), "127.0.0.1|127.0.0.1");
    assert_eq!(spoofed("/client"), "not matched");
    let up = spoofed("/up");
    assert!(up.contains("x-forwarded-for: 127.0.0.1\n"), "{up}");
    edge.proc.wait_stdout("\"uri\":\"/up\"", WAIT).unwrap();
    let lines = access_lines(&edge);
    let who = |uri: &str, remote: &str| {
        lines
            .iter()
            .find(|l| l["request"]["uri"] == uri && l["request"]["remote_ip"] == remote)
            .unwrap_or_else(|| panic!("no line for {uri} from {remote} in {lines:?}"))
    };
    assert_eq!(
        who("/who", "127.0.0.2")["request"]["client_ip"],
        "203.0.113.9"
    );
    assert_eq!(
        who("/who", "127.0.0.1")["request"]["client_ip"],
        "127.0.0.1"
    );
    edge.stop();
}

#[test]
fn strict_trusted_proxies_take_the_rightmost_untrusted_address() {
    let upstreams = Upstreams::new();
    let edge = start_edge(
        "\t\ttrusted_proxies static 127.0.0.2 10.0.0.0/8\n\t\ttrusted_proxies_strict\n",
        upstreams.echo(),
    );
    let who = Req::get("/who")
        .from("127.0.0.2")
        .header("X-Forwarded-For", "6.6.6.6, 203.0.113.9, 10.1.2.3")
        .send(edge.port("http"))
        .text();
    assert_eq!(who, "203.0.113.9|127.0.0.2");
    edge.stop();
}

#[test]
fn behind_a_proxy_protocol_sender_the_named_client_is_the_peer_on_http_and_https() {
    let upstreams = Upstreams::new();
    let edge = start_edge(
        "\t\tlistener_wrappers {\n\t\t\tproxy_protocol {\n\t\t\t\ttimeout 2s\n\t\t\t\tallow 127.0.0.0/8\n\t\t\t}\n\t\t\ttls\n\t\t}\n\t\ttrusted_proxies static 10.0.0.0/8\n",
        upstreams.echo(),
    );
    let port = edge.port("http");
    let v2 = proxy_v2([198, 51, 100, 7], 40000, [192, 0, 2, 1], 80);
    let who = raw_get("127.0.0.1", port, &v2, "/who");
    assert_eq!(body(&who), "198.51.100.7|198.51.100.7", "{who}");
    assert_eq!(body(&raw_get("127.0.0.1", port, &v2, "/remote")), "matched");
    let up = raw_get("127.0.0.1", port, &v2, "/up");
    assert!(up.contains("x-forwarded-for: 198.51.100.7\n"), "{up}");
    let v1 = b"PROXY TCP4 203.0.113.5 192.0.2.1 5555 80\r\n";
    assert_eq!(
        body(&raw_get("127.0.0.1", port, v1, "/who")),
        "203.0.113.5|203.0.113.5"
    );
    // The balancer's own health check (v2 LOCAL) is served as coming from the balancer.
    let mut local = v2.clone();
    local[12] = 0x20;
    assert_eq!(
        body(&raw_get("127.0.0.1", port, &local, "/who")),
        "127.0.0.1|127.0.0.1"
    );
    // No header, or a malformed one: closed without an answer.
    assert_eq!(raw_get("127.0.0.1", port, b"", "/who"), "");
    assert_eq!(
        raw_get("127.0.0.1", port, b"PROXY TCP4 1.2.3.4\r\n", "/who"),
        ""
    );

    // On the HTTPS port the header comes before the TLS handshake.
    let https = edge.port("https");
    let tls = crate::support::client_config(&edge.root(), &[b"http/1.1"]);
    let mut tcp = TcpStream::connect(("127.0.0.1", https)).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(&proxy_v2([203, 0, 113, 77], 1, [192, 0, 2, 1], 443))
        .unwrap();
    let conn = rustls::ClientConnection::new(tls, "app.local".try_into().unwrap()).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    stream
        .write_all(b"GET /who HTTP/1.1\r\nHost: app.local\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got);
    assert_eq!(body(&got), "203.0.113.77|203.0.113.77", "{got}");

    edge.proc.wait_stdout("\"uri\":\"/up\"", WAIT).unwrap();
    let lines = access_lines(&edge);
    assert!(
        lines
            .iter()
            .any(|l| l["request"]["uri"] == "/up" && l["request"]["remote_ip"] == "198.51.100.7"),
        "{lines:?}"
    );
    edge.stop();
}

#[test]
fn a_proxy_protocol_header_from_a_peer_outside_allow_closes_the_connection() {
    let upstreams = Upstreams::new();
    let edge = start_edge(
        "\t\tlistener_wrappers {\n\t\t\tproxy_protocol {\n\t\t\t\tallow 127.0.0.2/32\n\t\t\t}\n\t\t\ttls\n\t\t}\n",
        upstreams.echo(),
    );
    let port = edge.port("http");
    let v2 = proxy_v2([198, 51, 100, 7], 40000, [192, 0, 2, 1], 80);
    assert_eq!(raw_get("127.0.0.1", port, &v2, "/who"), "");
    assert_eq!(
        body(&raw_get("127.0.0.2", port, &v2, "/who")),
        "198.51.100.7|198.51.100.7"
    );
    edge.stop();
}
