//! `forward_auth` against Caddy 2.6: an Authelia-shaped auth server started in the test
//! approves a session cookie or a bearer token (answering 200 with Remote-* fields) and
//! sends everything else to its login page (302) or refuses it (401); the edge and Caddy
//! serve the same Caddyfile in front of it and of an echo backend, so what the client gets
//! and what reaches the backend are compared.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::http::{Request, Response};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::differential::{Both, Req};
use crate::support::Upstreams;

/// What the auth server saw, on one line: method, target, the X-Forwarded-* fields, Host,
/// the body's length.
fn saw(req: &hyper::http::request::Parts, body: &[u8]) -> String {
    let h = |name: &str| {
        req.headers
            .get(name)
            .map_or("-", |v| v.to_str().unwrap_or("?"))
            .to_owned()
    };
    format!(
        "{} {} | method={} uri={} proto={} host={} for={} | Host={} | body={}",
        req.method,
        req.uri,
        h("x-forwarded-method"),
        h("x-forwarded-uri"),
        h("x-forwarded-proto"),
        h("x-forwarded-host"),
        h("x-forwarded-for"),
        h("host"),
        body.len()
    )
}

/// The auth server: cookie `session=alice` or `Authorization: Bearer bob-token` is let in
/// with its Remote-* fields, `session=nobody` is let in with none; a DELETE without either
/// gets 401, anything else a 302 to the login page naming where the client was going.
fn start_auth(upstreams: &Upstreams) -> SocketAddr {
    let listener = upstreams
        .runtime
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    upstreams.runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let seen = saw(&parts, &body);
                    let cookie = parts
                        .headers
                        .get("cookie")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let bearer = parts
                        .headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let who: Option<&[(&str, &str)]> = if cookie.contains("session=alice") {
                        Some(&[
                            ("Remote-User", "alice"),
                            ("Remote-Groups", "admins,dev"),
                            ("Remote-Email", "alice@example.org"),
                        ])
                    } else if bearer == "Bearer bob-token" {
                        Some(&[("Remote-User", "bob"), ("Remote-Groups", "users")])
                    } else if cookie.contains("session=nobody") {
                        Some(&[])
                    } else {
                        None
                    };
                    let mut response = Response::builder().header("x-auth-saw", seen);
                    let text = match who {
                        Some(fields) => {
                            for (name, value) in fields {
                                response = response.header(*name, *value);
                            }
                            response = response.status(200);
                            "authorized"
                        }
                        None if parts
                            .headers
                            .get("x-forwarded-method")
                            .is_some_and(|m| m == "DELETE") =>
                        {
                            response = response
                                .status(401)
                                .header("www-authenticate", "Bearer realm=\"lab\"");
                            "unauthorized"
                        }
                        None => {
                            let h = |name: &str| {
                                parts
                                    .headers
                                    .get(name)
                                    .map_or("", |v| v.to_str().unwrap_or(""))
                                    .to_owned()
                            };
                            let back = format!(
                                "{}://{}{}",
                                h("x-forwarded-proto"),
                                h("x-forwarded-host"),
                                h("x-forwarded-uri")
                            );
                            response = response
                                .status(302)
                                .header("location", format!("https://auth.example.org/?rd={back}"))
                                .header("set-cookie", "auth_flow=1; Path=/");
                            "<a href=\"https://auth.example.org/\">Found</a>"
                        }
                    };
                    Ok::<_, Infallible>(
                        response
                            .header("content-type", "text/html; charset=utf-8")
                            .body(Full::new(Bytes::from(text)))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

const SITE: &str = "http://plain.local {
	forward_auth @AUTH@ {
		uri /api/authz/forward-auth?src=lab
		copy_headers Remote-User Remote-Groups Remote-Email>X-Email
	}
	reverse_proxy @ECHO@
}

http://open.local {
	forward_auth /private/* @AUTH@ {
		uri /api/verify
		copy_headers Remote-User
		header_up X-Original-Host {host}
	}
	reverse_proxy @ECHO@
}
";

#[test]
fn forward_auth_lets_through_only_what_the_auth_server_approves_as_caddy_does() {
    let upstreams = Upstreams::new();
    let auth = start_auth(&upstreams);
    let both = Both::start_with(upstreams, SITE, &[("@AUTH@", auth.to_string())]);
    let denied = [
        "location",
        "set-cookie",
        "content-type",
        "x-auth-saw",
        "www-authenticate",
    ];

    // No session: the auth server's redirect to its login page, as it sent it.
    let pair = both.get("/app/page?x=1&y=%20z");
    pair.caddy_status(302).assert_same(&denied);
    assert_eq!(
        pair.edge.header("location").as_deref(),
        Some("https://auth.example.org/?rd=http://plain.local/app/page?x=1&y=%20z")
    );
    assert!(
        !pair.edge.text().contains("GET /app"),
        "the backend answered:\n{}",
        pair.edge
    );
    // What the auth server was asked: a GET of its uri, the client's method and target in
    // X-Forwarded-*, and no body even when the client sent one.
    both.request(
        &Req::new("POST", "/submit?draft=1")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("title=hello"),
    )
    .caddy_status(302)
    .assert_same(&denied);
    both.request(&Req::new("DELETE", "/item/3"))
        .caddy_status(401)
        .assert_same(&denied);

    // A session: the backend gets the request with the auth server's fields on it.
    let alice = "session=alice; theme=dark";
    let pair = both.request(&Req::get("/app/page?x=1").header("Cookie", alice));
    pair.caddy_status(200).assert_same(&["content-type"]);
    let seen = pair.edge.text();
    assert!(seen.starts_with("GET /app/page?x=1\n"), "{seen}");
    for line in [
        "remote-user: alice",
        "remote-groups: admins,dev",
        "x-email: alice@example.org",
    ] {
        assert!(seen.contains(line), "{line} missing:\n{seen}");
    }
    assert!(!seen.contains("remote-email"), "{seen}");
    // A client's own Remote-User and X-Email never reach the backend.
    let pair = both.request(
        &Req::get("/app")
            .header("Cookie", alice)
            .header("Remote-User", "admin")
            .header("X-Email", "root@example.org"),
    );
    pair.caddy_status(200).assert_same(&[]);
    assert!(
        pair.edge.text().contains("remote-user: alice\n"),
        "{}",
        pair.edge
    );
    assert!(!pair.edge.text().contains("admin\n"), "{}", pair.edge);
    assert!(!pair.edge.text().contains("root@"), "{}", pair.edge);
    // The body goes to the backend whole, with the client's method.
    let pair = both.request(
        &Req::new("POST", "/comments")
            .header("Cookie", alice)
            .header("Content-Type", "application/json")
            .body("{\"text\":\"a comment\"}"),
    );
    pair.caddy_status(200).assert_same(&[]);
    assert!(
        pair.edge.text().ends_with("\n\n{\"text\":\"a comment\"}"),
        "{}",
        pair.edge
    );
    // A bearer token, another user, whose answer has no Remote-Email: the backend gets no
    // X-Email. (Caddy 2.6 sends the field with its placeholder's text,
    // `{http.reverse_proxy.header.Remote-Email}`: a deliberate difference.)
    let pair = both.request(
        &Req::new("DELETE", "/item/3")
            .header("Authorization", "Bearer bob-token")
            .header("Remote-Groups", "admins")
            .header("X-Email", "root@example.org"),
    );
    pair.caddy_status(200).assert_same_head(&[]);
    let seen = pair.edge.text();
    assert!(seen.starts_with("DELETE /item/3\n"), "{seen}");
    assert!(seen.contains("remote-groups: users\n"), "{seen}");
    assert!(seen.contains("remote-user: bob\n"), "{seen}");
    assert!(!seen.contains("x-email"), "{seen}");
    assert!(
        pair.caddy
            .text()
            .contains("x-email: {http.reverse_proxy.header.Remote-Email}")
    );

    // Only the matched paths ask the auth server.
    let open = |target: &str| Req::get(target).host(Some("open.local"));
    both.request(&open("/public/x"))
        .caddy_status(200)
        .assert_same(&[]);
    both.request(&open("/private/x"))
        .caddy_status(302)
        .assert_same(&denied);
    let pair = both.request(&open("/private/x").header("Cookie", alice));
    pair.caddy_status(200).assert_same(&[]);
    assert!(
        pair.edge.text().contains("remote-user: alice\n"),
        "{}",
        pair.edge
    );

    // Let in without a Remote-User: a forged one is removed. (Caddy 2.6 sends the
    // placeholder's text instead, a deliberate difference; newer Caddy removes it too.)
    let pair = both.request(
        &Req::get("/app")
            .header("Cookie", "session=nobody")
            .header("Remote-User", "admin"),
    );
    assert_eq!((pair.edge.status, pair.caddy.status), (200, 200));
    assert!(!pair.edge.text().contains("remote-user"), "{}", pair.edge);
    assert!(!pair.caddy.text().contains("admin\n"), "{}", pair.caddy);
    both.stop();
}

/// Authelia's documented longhand of forward_auth (the corpus's file 54).
const LONGHAND: &str = "http://plain.local {
	route {
		reverse_proxy @AUTH@ {
			method GET
			rewrite \"/api/verify?rd=https://auth.example.org\"
			header_up X-Forwarded-Method {method}
			header_up X-Forwarded-Uri {uri}
			@good status 2xx
			handle_response @good {
				request_header Remote-User {http.reverse_proxy.header.Remote-User}
				request_header Remote-Groups {http.reverse_proxy.header.Remote-Groups}
				request_header X-Auth-Status {http.reverse_proxy.status_code}
			}
			@denied {
				status 1xx 3xx 4xx 5xx
			}
			handle_response @denied {
				copy_response
				copy_response_headers {
					exclude Connection Keep-Alive Te Trailers Transfer-Encoding Upgrade
				}
			}
		}
		reverse_proxy @ECHO@
	}
}
";

#[test]
fn handle_response_routes_run_on_the_upstreams_answer_as_caddy_runs_them() {
    let upstreams = Upstreams::new();
    let auth = start_auth(&upstreams);
    let both = Both::start_with(upstreams, LONGHAND, &[("@AUTH@", auth.to_string())]);
    // Denied: copy_response sends the auth server's answer. (Caddy 2.6 sends each of its
    // fields twice, copy_response_headers adding what copy_response copies again; the edge
    // once.)
    for req in [
        Req::get("/app/page?x=1"),
        Req::new("POST", "/form").body("a=1"),
        Req::new("DELETE", "/item/3"),
    ] {
        let pair = both.request(&req);
        pair.assert_same(&[]);
        assert!(
            matches!(pair.caddy.status, 302 | 401),
            "{}: {}",
            pair.request,
            pair.caddy
        );
        let caddy_saw = pair.caddy.header("x-auth-saw").unwrap();
        let caddy_saw = caddy_saw.split(", GET").next().unwrap();
        assert_eq!(pair.edge.header("x-auth-saw").as_deref(), Some(caddy_saw));
        if pair.caddy.status == 302 {
            let location = pair.edge.header("location").unwrap();
            assert!(
                location.starts_with("https://auth.example.org/?rd=http://plain.local/"),
                "{location}"
            );
            assert!(
                pair.caddy
                    .header("location")
                    .unwrap()
                    .starts_with(&location)
            );
        }
    }
    // Approved: the request goes on with the fields the routes set.
    let pair = both.request(
        &Req::new("POST", "/comments?id=4")
            .header("Cookie", "session=alice")
            .header("Remote-User", "admin")
            .body("text=hi"),
    );
    pair.caddy_status(200).assert_same(&["content-type"]);
    let seen = pair.edge.text();
    assert!(seen.starts_with("POST /comments?id=4\n"), "{seen}");
    for line in [
        "remote-user: alice\n",
        "remote-groups: admins,dev\n",
        "x-auth-status: 200\n",
    ] {
        assert!(seen.contains(line), "{line} missing:\n{seen}");
    }
    assert!(seen.ends_with("\n\ntext=hi"), "{seen}");
    both.stop();
}
