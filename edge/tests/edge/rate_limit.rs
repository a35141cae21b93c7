//! `rate_limit` end to end: the limit, the 429 and its `Retry-After`, keys kept apart, a
//! window passing, counters across reloads, memory under a spray of keys, and `edge check`
//! refusing bad zones by line.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use testkit::Scratch;

use crate::support::{EDGE, Edge, WAIT, globals, run};

/// A site answering "ok", limited by `rate_limit` with `zones` (the zone blocks' text).
fn site(zones: &str) -> String {
    format!(
        "http://rl.local {{\n\trate_limit {{\n{zones}\n\t}}\n\trespond \"ok\"\n}}\n\nhttp://other.local {{\n\trespond \"other\"\n}}\n"
    )
}

/// A zone keyed on the X-Client header.
fn header_zone(events: u32, window: &str) -> String {
    format!(
        "\t\tzone per_client {{\n\t\t\tkey {{header.X-Client}}\n\t\t\tevents {events}\n\t\t\twindow {window}\n\t\t}}"
    )
}

fn start(zones: &str) -> Edge {
    let dir = Scratch::new("edge-rate-limit").unwrap();
    let config = dir.join("Caddyfile");
    std::fs::write(&config, format!("{}{}", globals(&dir, ""), site(zones))).unwrap();
    Edge::start(dir, config, "--caddyfile")
}

/// Status and Retry-After of `GET /` on rl.local as client `client`.
fn get(port: u16, client: &str) -> (u16, Option<u64>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: rl.local\r\nX-Client: {client}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {reply:?}"));
    let retry = reply
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .map(|v| v.trim().parse().unwrap());
    (status, retry)
}

fn reload(edge: &Edge, zones: &str) {
    std::fs::write(
        &edge.config,
        format!("{}{}", globals(&edge.dir, ""), site(zones)),
    )
    .unwrap();
    edge.proc.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    edge.proc.wait_notification("RELOADING=1", WAIT).unwrap();
    edge.proc.wait_ready(WAIT).unwrap();
    edge.proc.wait_stderr("reloaded", WAIT).unwrap();
}

#[test]
fn the_eleventh_request_of_ten_a_minute_gets_429_with_retry_after_and_other_keys_pass() {
    let edge = start(&header_zone(10, "1m"));
    let port = edge.port("http");
    let first = Instant::now();
    for i in 0..10 {
        assert_eq!(get(port, "alice"), (200, None), "request {i}");
    }
    let (status, retry) = get(port, "alice");
    let elapsed = first.elapsed().as_secs();
    assert_eq!(status, 429);
    // A minute after alice's requests, rounded up to whole seconds.
    let retry = retry.expect("a Retry-After on the 429");
    assert!(
        (60 - elapsed.min(60)..=60).contains(&retry),
        "Retry-After {retry} after {elapsed}s"
    );
    // Another key has its own count, and the refusal was logged once with the zone.
    assert_eq!(get(port, "bob"), (200, None));
    assert_eq!(get(port, "alice").0, 429);
    let logged = edge.proc.wait_stderr("rate limit exceeded", WAIT).unwrap();
    assert!(logged.contains("per_client"), "{logged}");
    edge.stop();
}

#[test]
fn a_refused_key_passes_again_once_the_retry_after_it_was_given_has_passed() {
    let edge = start(&header_zone(2, "2s"));
    let port = edge.port("http");
    assert_eq!(get(port, "carol").0, 200);
    assert_eq!(get(port, "carol").0, 200);
    let (status, retry) = get(port, "carol");
    assert_eq!(status, 429);
    let retry = retry.unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // The server said when; a request after that passes.
    std::thread::sleep(Duration::from_secs(retry));
    assert_eq!(get(port, "carol"), (200, None));
    edge.stop();
}

#[test]
fn a_reload_keeps_the_counters_of_an_unchanged_zone_and_a_changed_zone_starts_afresh() {
    let zone = header_zone(2, "1m");
    let edge = start(&zone);
    let port = edge.port("http");
    assert_eq!(get(port, "dave").0, 200);
    assert_eq!(get(port, "dave").0, 200);
    assert_eq!(get(port, "dave").0, 429);

    // The same zone, another one beside it: dave stays limited.
    let two = format!(
        "{zone}\n\t\tzone everyone {{\n\t\t\tkey static\n\t\t\tevents 1000\n\t\t\twindow 1m\n\t\t}}"
    );
    reload(&edge, &two);
    assert_eq!(
        get(port, "dave").0,
        429,
        "the unchanged zone kept its counters"
    );

    // The zone's limit changes: its counters start afresh.
    reload(&edge, &header_zone(3, "1m"));
    assert_eq!(get(port, "dave").0, 200, "a changed zone starts afresh");
    edge.stop();
}

/// The edge's resident memory now, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Sends `GET /` for each key in `keys` on one keep-alive connection; counts the 200s.
fn spray(port: u16, keys: std::ops::Range<u32>) -> usize {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut ok = 0;
    for k in keys {
        // One write a request: a request in pieces waits on delayed ACKs.
        let request = format!("GET / HTTP/1.1\r\nHost: rl.local\r\nX-Client: spoofed-{k}\r\n\r\n");
        writer.write_all(request.as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.starts_with("HTTP/1.1 200") {
            ok += 1;
        }
        let mut length = 0;
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
    }
    ok
}

#[test]
fn twenty_thousand_distinct_keys_do_not_grow_memory_past_the_table() {
    // A thousand events a key: a table holding each key's timestamps would need 8 kB a key,
    // 160 MB for the spray; the bounded table holds 1000 keys whatever comes.
    let edge = start(
        "\t\tzone sprayed {\n\t\t\tkey {header.X-Client}\n\t\t\tevents 1000\n\t\t\twindow 1m\n\t\t\tmax_keys 1000\n\t\t}",
    );
    let port = edge.port("http");
    let pid = edge.proc.pid();
    // Warm up: connections, buffers and the whole table in use.
    assert_eq!(spray(port, 0..2000), 2000);
    let before = rss_kib(pid);
    let threads: Vec<_> = (0..4u32)
        .map(|t| std::thread::spawn(move || spray(port, 2000 + t * 5000..2000 + (t + 1) * 5000)))
        .collect();
    let passed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(passed, 20_000, "every new key is under its limit");
    let after = rss_kib(pid);
    assert!(
        after < before + 8 * 1024,
        "resident memory grew from {before} KiB to {after} KiB over 20000 keys"
    );
    edge.stop();
}

#[test]
fn edge_check_refuses_bad_zones_naming_the_file_and_line() {
    let dir = Scratch::new("edge-rate-limit-check").unwrap();
    let file = dir.join("Caddyfile");
    let cases = [
        (
            "zone z {\n\t\t\tevents 5\n\t\t\twindow 1m\n\t\t}",
            3,
            "needs key",
        ),
        (
            "zone z {\n\t\t\tkey {remote_host}\n\t\t\twindow 1m\n\t\t}",
            3,
            "needs events",
        ),
        (
            "zone z {\n\t\t\tkey {remote_host}\n\t\t\tevents 5\n\t\t}",
            3,
            "needs window",
        ),
        (
            "zone z {\n\t\t\tkey {remote_host}\n\t\t\tevents 0\n\t\t\twindow 1m\n\t\t}",
            5,
            "events must be at least 1",
        ),
        (
            "zone z {\n\t\t\tkey {remote_host}\n\t\t\tevents 5\n\t\t\twindow 1m\n\t\t\tburst 3\n\t\t}",
            7,
            "unknown subdirective \"burst\"",
        ),
        (
            "log_key\n\t\tnonsense",
            4,
            "unknown subdirective \"nonsense\"",
        ),
        (
            "zone z {\n\t\t\tkey {nope}\n\t\t\tevents 5\n\t\t\twindow 1m\n\t\t}",
            2,
            "unknown placeholder {nope}",
        ),
    ];
    for (zones, line, message) in cases {
        // The site's rate_limit opens on line 2.
        std::fs::write(
            &file,
            format!("http://rl.local {{\n\trate_limit {{\n\t\t{zones}\n\t}}\n\trespond ok\n}}\n"),
        )
        .unwrap();
        let ran = run(EDGE, &["check", "--caddyfile", &file.display().to_string()]);
        assert_eq!(ran.code, 78, "{zones}: {}", ran.stderr);
        assert!(
            ran.stderr.contains(&format!("{}:{line}", file.display())),
            "{zones}: want line {line}: {}",
            ran.stderr
        );
        assert!(ran.stderr.contains(message), "{zones}: {}", ran.stderr);
    }
}

#[test]
fn rate_limit_runs_before_basic_auth_unless_order_places_it() {
    let dir = Scratch::new("edge-rate-limit-order").unwrap();
    let file = dir.join("Caddyfile");
    let site = "http://rl.local {\n\tbasic_auth {\n\t\talice $2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy\n\t}\n\trate_limit {\n\t\tzone z {\n\t\t\tkey {remote_host}\n\t\t\tevents 5\n\t\t\twindow 1m\n\t\t}\n\t}\n\trespond ok\n}\n";
    for (globals, first) in [
        ("", "rate_limit"),
        ("{\n\torder rate_limit after basic_auth\n}\n", "basic_auth"),
        ("{\n\torder rate_limit first\n}\n", "rate_limit"),
    ] {
        std::fs::write(&file, format!("{globals}{site}")).unwrap();
        let ran = run(EDGE, &["check", "--caddyfile", &file.display().to_string()]);
        assert_eq!(ran.code, 0, "{}", ran.stderr);
        let rl = ran.stdout.find("rate_limit").unwrap();
        let ba = ran.stdout.find("basic_auth").unwrap();
        assert_eq!(
            if rl < ba { "rate_limit" } else { "basic_auth" },
            first,
            "{globals}: {}",
            ran.stdout
        );
    }
    std::fs::write(&file, format!("{{\n\torder respond first\n}}\n{site}")).unwrap();
    let ran = run(EDGE, &["check", "--caddyfile", &file.display().to_string()]);
    assert_eq!(ran.code, 78, "{}", ran.stderr);
    assert!(ran.stderr.contains(":2"), "{}", ran.stderr);
    assert!(
        ran.stderr.contains("only rate_limit can be ordered"),
        "{}",
        ran.stderr
    );
}
