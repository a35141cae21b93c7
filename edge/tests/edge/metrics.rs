//! `metrics` and the admin endpoint against Caddy: the same Caddyfile served by both, the
//! same requests sent, and the Prometheus expositions compared family by family (names,
//! label names, how counts move); `/load`, a refused load and foreign Hosts and Origins on
//! both admin endpoints. Plus what only the edge exports: upstream health as it changes,
//! certificate expiry.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use testkit::Scratch;

use crate::differential::{Both, Req};
use crate::support::{Edge, WAIT, globals, http_request};

/// One sample: the metric name and its labels (sorted), and the value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses a text exposition strictly: every line is `# HELP`/`# TYPE` or
/// `name{label="value",...} number`; anything else fails the test.
fn parse(text: &str) -> Samples {
    let mut samples = Samples::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        fn fail<T>(line: &str, text: &str) -> T {
            panic!("not an exposition line: {line:?}\n{text}")
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| fail(line, text));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| fail(line, text)),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (
                name,
                rest.strip_suffix('}').unwrap_or_else(|| fail(line, text)),
            ),
            None => (series, ""),
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
        {
            fail::<()>(line, text);
        }
        let mut map = BTreeMap::new();
        let mut rest = labels;
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"").unwrap_or_else(|| fail(line, text));
            // Values here hold no escaped quotes.
            let (value, after) = after.split_once('"').unwrap_or_else(|| fail(line, text));
            map.insert(key.to_owned(), value.to_owned());
            rest = after.strip_prefix(',').unwrap_or(after);
        }
        samples.insert((name.to_owned(), map), value);
    }
    samples
}

/// The metric families (names) of `samples` Caddy and the edge both may have: Go's runtime,
/// process and scrape metrics are Caddy's alone.
fn families(samples: &Samples) -> BTreeMap<String, BTreeSet<String>> {
    let mut families: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, labels) in samples.keys() {
        if !name.starts_with("caddy_") {
            continue;
        }
        families
            .entry(name.clone())
            .or_default()
            .extend(labels.keys().cloned());
    }
    families
}

/// `GET /metrics` from both; (edge, caddy).
fn scrape(both: &Both) -> (Samples, Samples) {
    let pair = both.get("/metrics");
    assert_eq!(pair.edge.status, 200, "{}", pair.edge.text());
    assert_eq!(pair.caddy.status, 200, "{}", pair.caddy.text());
    assert!(
        pair.edge
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        pair.edge.headers
    );
    (parse(&pair.edge.text()), parse(&pair.caddy.text()))
}

/// What `after` added to each of Caddy's counter-like samples (`_total`, `_count`) over
/// `before` (Go's own metrics left out).
fn deltas(before: &Samples, after: &Samples) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter(|((name, _), _)| {
            name.starts_with("caddy_") && (name.ends_with("_total") || name.ends_with("_count"))
        })
        .map(|(key, v)| {
            let was = before.get(key).copied().unwrap_or(0.0);
            (format!("{}{:?}", key.0, key.1), v - was)
        })
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

#[test]
fn metrics_families_labels_and_counts_move_as_caddys_do() {
    let both = Both::start(
        "{\n\tservers {\n\t\tmetrics\n\t}\n}\n\nhttp:// {\n\tmetrics /metrics\n\theader /page X-Test yes\n\trespond /page \"page\" 200\n\trespond /missing \"gone\" 404\n\treverse_proxy /echo @ECHO@\n}\n",
    );
    let (edge_before, caddy_before) = scrape(&both);
    for _ in 0..3 {
        both.get("/page").assert_same(&["x-test"]);
    }
    for _ in 0..2 {
        both.get("/missing").assert_same(&[]);
    }
    both.request(&Req::new("POST", "/echo").body("hello"));
    // Nothing answers: Caddy counts nothing for it.
    both.get("/nowhere").assert_same(&[]);
    let (edge, caddy) = scrape(&both);

    assert_eq!(
        families(&edge),
        families(&caddy),
        "families and label names"
    );
    for family in [
        "caddy_http_requests_total",
        "caddy_http_request_duration_seconds_bucket",
        "caddy_http_requests_in_flight",
        "caddy_http_response_size_bytes_count",
        "caddy_http_request_size_bytes_sum",
        "caddy_http_response_duration_seconds_count",
        "caddy_reverse_proxy_upstreams_healthy",
    ] {
        assert!(
            families(&edge).contains_key(family),
            "{family} missing: {edge:?}"
        );
    }
    let edge_moved = deltas(&edge_before, &edge);
    let caddy_moved = deltas(&caddy_before, &caddy);
    assert_eq!(edge_moved, caddy_moved, "what the requests added");
    let key = |name: &str, labels: &[(&str, &str)]| {
        let mut map: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        map.insert("server".into(), "srv0".into());
        format!("{name}{map:?}")
    };
    // The deltas Caddy shows are the ones the requests sent explain.
    for (name, labels, want) in [
        (
            "caddy_http_requests_total",
            &[("handler", "static_response")][..],
            5.0,
        ),
        ("caddy_http_requests_total", &[("handler", "headers")], 3.0),
        (
            "caddy_http_requests_total",
            &[("handler", "reverse_proxy")],
            1.0,
        ),
        (
            "caddy_http_request_duration_seconds_count",
            &[
                ("code", "200"),
                ("handler", "static_response"),
                ("method", "GET"),
            ],
            3.0,
        ),
        (
            "caddy_http_request_duration_seconds_count",
            &[
                ("code", "404"),
                ("handler", "static_response"),
                ("method", "GET"),
            ],
            2.0,
        ),
        (
            "caddy_http_response_size_bytes_count",
            &[
                ("code", "200"),
                ("handler", "reverse_proxy"),
                ("method", "POST"),
            ],
            1.0,
        ),
    ] {
        assert_eq!(
            caddy_moved.get(&key(name, labels)),
            Some(&want),
            "{name} {labels:?}: {caddy_moved:#?}"
        );
    }
    both.stop();
}

/// Scrapes `url` (plain HTTP, loopback) with curl until `done` holds for the exposition.
fn scrape_until(port: u16, path: &str, done: impl Fn(&Samples) -> bool) -> Samples {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = http_request(port, "GET", path, &[], "");
        assert_eq!(status, 200, "{body}");
        let samples = parse(&body);
        if done(&samples) {
            return samples;
        }
        assert!(Instant::now() < deadline, "never came: {body}");
        // The active health check runs every 100 ms: wait for its next round.
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sample(samples: &Samples, name: &str, label: (&str, &str)) -> Option<f64> {
    samples
        .iter()
        .find(|((n, l), _)| n == name && l.get(label.0).map(String::as_str) == Some(label.1))
        .map(|(_, v)| *v)
}

#[test]
fn an_unreachable_upstream_is_exported_as_unhealthy_and_a_live_one_as_healthy() {
    let upstreams = crate::support::Upstreams::new();
    let live = upstreams.http("live");
    let dead = testkit::ports::free_port().unwrap();
    let dir = Scratch::new("edge-metrics-health").unwrap();
    let config = dir.join("Caddyfile");
    std::fs::write(
        &config,
        format!(
            "{}http:// {{\n\tmetrics /metrics\n\treverse_proxy {live} 127.0.0.1:{dead} {{\n\t\thealth_uri /\n\t\thealth_interval 100ms\n\t\thealth_status 2xx\n\t}}\n}}\n",
            globals(&dir, "")
        ),
    )
    .unwrap();
    let edge = Edge::start(dir, config, "--caddyfile");
    let port = edge.port("http");
    let name = "caddy_reverse_proxy_upstreams_healthy";
    let dead_dial = format!("127.0.0.1:{dead}");
    let live_dial = live.to_string();
    let samples = scrape_until(port, "/metrics", |s| {
        sample(s, name, ("upstream", &dead_dial)) == Some(0.0)
    });
    assert_eq!(sample(&samples, name, ("upstream", &live_dial)), Some(1.0));
    edge.stop();
}

#[test]
fn the_expiry_of_a_served_certificate_is_exported_by_name() {
    let dir = Scratch::new("edge-metrics-certs").unwrap();
    let admin = testkit::ports::free_port().unwrap();
    let config = dir.join("Caddyfile");
    std::fs::write(
        &config,
        format!(
            "{}https://secure.local {{\n\ttls internal\n\trespond \"ok\"\n}}\n",
            globals(&dir, &format!("\tadmin localhost:{admin}\n"))
        ),
    )
    .unwrap();
    let edge = Edge::start(dir, config, "--caddyfile");
    let (status, body) = http_request(admin, "GET", "/metrics", &[], "");
    assert_eq!(status, 200, "{body}");
    let samples = parse(&body);
    let expiry = sample(
        &samples,
        "edge_tls_certificate_expiry_timestamp_seconds",
        ("name", "secure.local"),
    )
    .unwrap_or_else(|| panic!("no expiry for secure.local: {body}"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // An internal leaf lives hours to days, never more than a year.
    assert!(
        expiry > now + 3600.0 && expiry < now + 366.0 * 86400.0,
        "{expiry} vs now {now}"
    );
    // No request metrics without `servers { metrics }`.
    assert!(!body.contains("caddy_http_"), "{body}");
    edge.stop();
}

#[test]
fn admin_loads_refused_loads_and_foreign_hosts_go_as_in_caddy() {
    let both = Both::start("{\n\tadmin @ADMIN@\n}\n\nhttp://plain.local {\n\trespond \"one\"\n}\n");
    let (edge_admin, caddy_admin) = both.admin_ports;
    let pair = both.get("/");
    assert_eq!(
        (pair.edge.text(), pair.caddy.text()),
        ("one".into(), "one".into())
    );

    // A new Caddyfile through /load: the next request sees it on both.
    let files = both.files.clone();
    let load = |port: u16, text: &str| {
        http_request(
            port,
            "POST",
            "/load",
            &[("Content-Type", "text/caddyfile")],
            text,
        )
    };
    let edge_file = std::fs::read_to_string(&files.0).unwrap();
    let caddy_file = std::fs::read_to_string(&files.1).unwrap();
    let two =
        |text: &str| text.replace("respond \"one\"", "respond /new \"two\"\n\trespond \"one\"");
    let (edge_status, edge_body) = load(edge_admin, &two(&edge_file));
    let (caddy_status, caddy_body) = load(caddy_admin, &two(&caddy_file));
    assert_eq!(
        (edge_status, caddy_status),
        (200, 200),
        "{edge_body} / {caddy_body}"
    );
    let pair = both.get("/new");
    assert_eq!(
        (pair.edge.text(), pair.caddy.text()),
        ("two".into(), "two".into())
    );

    // A broken one is refused by both (4xx) and the loaded config keeps serving.
    let broken = |text: &str| two(text).replace("respond /new", "bogus_directive /new");
    let (edge_status, edge_body) = load(edge_admin, &broken(&edge_file));
    let (caddy_status, caddy_body) = load(caddy_admin, &broken(&caddy_file));
    assert_eq!(
        (edge_status, caddy_status),
        (400, 400),
        "{edge_body} / {caddy_body}"
    );
    assert!(edge_body.contains("bogus_directive"), "{edge_body}");
    assert!(caddy_body.contains("bogus_directive"), "{caddy_body}");
    let pair = both.get("/new");
    assert_eq!(
        (pair.edge.text(), pair.caddy.text()),
        ("two".into(), "two".into())
    );

    // A Host that is not loopback (DNS rebinding): 403 from both, for reads and loads.
    for (method, path) in [("GET", "/config/"), ("POST", "/load")] {
        let foreign = |port: u16| {
            http_request(
                port,
                method,
                path,
                &[
                    ("Host", &format!("evil.example:{port}")),
                    ("Content-Type", "text/caddyfile"),
                ],
                "",
            )
            .0
        };
        assert_eq!(
            (foreign(edge_admin), foreign(caddy_admin)),
            (403, 403),
            "{method} {path}"
        );
    }
    // A foreign Origin: Caddy 2.6 lets it through unless enforce_origin is set; the edge
    // always refuses it (see DIFFERENCES in man edge-caddyfile).
    let origin = |port: u16| {
        http_request(
            port,
            "GET",
            "/config/",
            &[("Origin", "http://evil.example")],
            "",
        )
        .0
    };
    assert_eq!((origin(edge_admin), origin(caddy_admin)), (403, 200));
    let pair = both.get("/new");
    assert_eq!(
        (pair.edge.text(), pair.caddy.text()),
        ("two".into(), "two".into())
    );
    both.stop();
}

#[test]
fn a_site_with_a_host_counts_as_caddys_subroute_and_a_dead_upstream_as_an_error() {
    let dead = testkit::ports::free_port().unwrap();
    let both = Both::start_with(
        crate::support::Upstreams::new(),
        "{\n\tservers {\n\t\tmetrics\n\t}\n}\n\nhttp://plain.local {\n\tmetrics /metrics\n\treverse_proxy /down/* @DEAD@\n\trespond /page \"up\"\n}\n",
        &[("@DEAD@", format!("127.0.0.1:{dead}"))],
    );
    let (edge_before, caddy_before) = scrape(&both);
    both.get("/page").assert_same(&[]);
    both.get("/page").assert_same(&[]);
    let pair = both.get("/down/x");
    assert_eq!((pair.edge.status, pair.caddy.status), (502, 502));
    let (edge, caddy) = scrape(&both);
    assert_eq!(
        families(&edge),
        families(&caddy),
        "families and label names"
    );
    let edge_moved = deltas(&edge_before, &edge);
    let caddy_moved = deltas(&caddy_before, &caddy);
    assert_eq!(edge_moved, caddy_moved, "what the requests added");
    let errors = "caddy_http_request_errors_total{\"handler\": \"subroute\", \"server\": \"srv0\"}";
    assert_eq!(caddy_moved.get(errors), Some(&1.0), "{caddy_moved:#?}");
    let total = "caddy_http_requests_total{\"handler\": \"subroute\", \"server\": \"srv0\"}";
    // Two answers, one failure, and the first scrape.
    assert_eq!(caddy_moved.get(total), Some(&4.0), "{caddy_moved:#?}");
    both.stop();
}
