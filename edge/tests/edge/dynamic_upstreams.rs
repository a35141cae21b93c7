//! `reverse_proxy { dynamic a | dynamic srv }` against a real DNS server (BIND, started by
//! testkit on loopback), the edge and Caddy 2.6 side by side on the same Caddyfile, both
//! pointed at that server with `resolvers`: which backends answer, before and after the zone
//! changes, and what a name without records answers.
//!
//! The backends of `dynamic a` share a port on different loopback addresses (127.0.0.2-4), as
//! an A record gives only an address; each answers with its name.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::http::{Request, Response};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use testkit::Named;

use crate::differential::{Both, Pair};
use crate::support::{Upstreams, WAIT};

/// Starts a server answering `name` on each `(address, name)` of `names`, all on one port.
fn same_port(ups: &Upstreams, names: &[(Ipv4Addr, &'static str)]) -> u16 {
    'again: for _ in 0..20 {
        let first = std::net::TcpListener::bind((names[0].0, 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for (ip, _) in &names[1..] {
            match std::net::TcpListener::bind((*ip, port)) {
                Ok(l) => listeners.push(l),
                // Taken on that address: another port.
                Err(_) => continue 'again,
            }
        }
        for (listener, (_, name)) in listeners.into_iter().zip(names) {
            listener.set_nonblocking(true).unwrap();
            let name = *name;
            ups.runtime.spawn(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let service = service_fn(move |_: Request<Incoming>| async move {
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        }
        return port;
    }
    panic!("no port free on all of {names:?}");
}

/// The bodies of `n` requests for `target` to each, as (edge's, Caddy's); every answer is a
/// 200. Bodies are compared as sets: which address comes first in a DNS answer rotates, so
/// the two need not choose alike request by request.
fn answers(both: &Both, target: &str, n: usize) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut edge, mut caddy) = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..n {
        let pair: Pair = both.get(target);
        pair.caddy_status(200);
        assert_eq!(pair.edge.status, 200, "{}", pair.edge);
        edge.insert(pair.edge.text());
        caddy.insert(pair.caddy.text());
    }
    (edge, caddy)
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[test]
fn dynamic_upstreams_spread_requests_over_every_address_in_dns_and_follow_zone_changes() {
    let ups = Upstreams::new();
    let ip = |last| Ipv4Addr::new(127, 0, 0, last);
    let port = same_port(&ups, &[(ip(2), "b"), (ip(3), "c"), (ip(4), "d")]);
    let (s1, s2) = (ups.http("s1"), ups.http("s2"));
    let dns = Named::builder()
        .zone("test")
        .records(&format!(
            "app IN A 127.0.0.2\napp IN A 127.0.0.3\ncached IN A 127.0.0.2\n\
             _http._tcp.svc IN SRV 10 1 {} localhost.\n_http._tcp.svc IN SRV 10 1 {} localhost.\n",
            s1.port(),
            s2.port()
        ))
        .start()
        .unwrap();
    let resolver = dns.addr().to_string();
    let both = Both::start_with(
        ups,
        "http://plain.local {\n\
         \thandle /a* {\n\t\treverse_proxy {\n\t\t\tdynamic a app.test @PORT@ {\n\t\t\t\trefresh 200ms\n\t\t\t\tresolvers @DNS@\n\t\t\t}\n\t\t\tlb_policy round_robin\n\t\t}\n\t}\n\
         \thandle /cached* {\n\t\treverse_proxy {\n\t\t\tdynamic a {\n\t\t\t\tname cached.test\n\t\t\t\tport @PORT@\n\t\t\t\trefresh 1h\n\t\t\t\tresolvers @DNS@\n\t\t\t}\n\t\t}\n\t}\n\
         \thandle /srv* {\n\t\treverse_proxy {\n\t\t\tdynamic srv {\n\t\t\t\tservice http\n\t\t\t\tproto tcp\n\t\t\t\tname svc.test\n\t\t\t\tresolvers @DNS@\n\t\t\t}\n\t\t\tlb_policy round_robin\n\t\t}\n\t}\n\
         \thandle /missing* {\n\t\treverse_proxy {\n\t\t\tdynamic a nowhere.test 80 {\n\t\t\t\tresolvers @DNS@\n\t\t\t}\n\t\t}\n\t}\n\
         }\n",
        &[("@PORT@", port.to_string()), ("@DNS@", resolver)],
    );
    let both_records = (set(&["b", "c"]), set(&["b", "c"]));
    assert_eq!(answers(&both, "/a", 6), both_records, "both A records");
    // Only the edge is asked for /srv: Caddy dials an SRV target as the record names it,
    // `localhost.`, which the system's resolver (glibc reads /etc/hosts without the final
    // dot) does not find here.
    let edge_only = |both: &Both, target: &str| {
        let reply = crate::differential::Req::get(target).send(both.edge_port());
        assert_eq!(reply.status, 200, "{target}: {reply}");
        reply.text()
    };
    let srv: BTreeSet<String> = (0..6).map(|_| edge_only(&both, "/srv")).collect();
    assert_eq!(srv, set(&["s1 /srv", "s2 /srv"]), "both SRV records");
    // Only the edge is asked for /cached: Caddy keeps one cache per name and port for all
    // handlers, so the edge alone shows its answer is kept for `refresh`.
    assert_eq!(edge_only(&both, "/cached"), "b");

    dns.update(
        "update delete app.test A 127.0.0.3\nupdate add app.test 0 A 127.0.0.4\n\
         update delete cached.test A\nupdate add cached.test 0 A 127.0.0.3",
    )
    .unwrap();
    assert_eq!(dns.dig("app.test", "A").unwrap().lines().count(), 2);
    // After `refresh` (200 ms) both servers look up again and use the new address.
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = answers(&both, "/a", 4);
        if seen == (set(&["b", "d"]), set(&["b", "d"])) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "127.0.0.4 never answered after the zone changed: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        edge_only(&both, "/cached"),
        "b",
        "within refresh (1h) the old answer is kept"
    );

    // A name without records: no upstream, as in Caddy (503).
    let pair = both.get("/missing");
    pair.assert_same_head(&[]).caddy_status(503);
    both.stop();
    drop(dns);
}

#[test]
fn an_unreachable_resolver_answers_as_caddy_does() {
    let ups = Upstreams::new();
    // Free, and outside the ephemeral range: no DNS server there, and no later bind(0) takes it.
    let dead = testkit::ports::free_port().unwrap();
    let both = Both::start_with(
        ups,
        "http://plain.local {\n\treverse_proxy {\n\t\tdynamic a {\n\t\t\tname app.test\n\t\t\tresolvers @DNS@\n\t\t\tdial_timeout 1s\n\t\t}\n\t}\n}\n",
        &[(
            "@DNS@",
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), dead).to_string(),
        )],
    );
    both.get("/").assert_same_head(&[]).caddy_status(503);
    both.stop();
}
