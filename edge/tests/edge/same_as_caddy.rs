//! The directives the edge supports answer as Caddy 2.6 does on the same Caddyfile: each test
//! serves one template from both (see `differential`) and sends the same requests to each.

use crate::differential::{Both, Req};

/// bcrypt of "hunter2" at cost 4, so a check takes a millisecond on either side.
const HASH: &str = "$2b$04$abcdefghijklmnopqrstuuV3duMsC0HpUex6N9qapiuOHHWkwRXVm";
/// `alice:hunter2`, `alice:wrong`, `bob:hunter2`.
const RIGHT: &str = "Basic YWxpY2U6aHVudGVyMg==";
const WRONG: &str = "Basic YWxpY2U6d3Jvbmc=";
const STRANGER: &str = "Basic Ym9iOmh1bnRlcjI=";

#[test]
fn a_path_matched_reverse_proxy_forwards_the_same_requests_as_caddy() {
    let upstreams = crate::support::Upstreams::new();
    let web = upstreams.http("web");
    let both = Both::start_with(
        upstreams,
        "http://plain.local {\n\treverse_proxy /api/* @ECHO@\n\treverse_proxy @WEB@\n}\n\nhttp://other.local {\n\treverse_proxy @ECHO@\n}\n",
        &[("@WEB@", web.to_string())],
    );
    both.get("/api/users?id=7&sort=name")
        .caddy_status(200)
        .assert_same(&["content-type"]);
    for target in [
        "/api/",
        "/api/a/b/c",
        "/api/%2e%2e/x",
        "/api/caf%C3%A9?q=%20",
    ] {
        both.get(target).assert_same(&["content-type"]);
    }
    for target in ["/api", "/apix", "/", "/other/api/x"] {
        both.get(target)
            .assert_same(&["content-type", "x-upstream"]);
    }
    both.request(
        &Req::new("POST", "/api/form")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("X-Custom", "one")
            .body("a=1&b=2"),
    )
    .assert_same(&["content-type"]);
    both.request(&Req::new("DELETE", "/api/item/3").header("Authorization", "Bearer fake"))
        .assert_same(&[]);
    both.request(&Req::get("/anything?x=1").host(Some("other.local")))
        .caddy_status(200)
        .assert_same(&["content-type"]);
    both.stop();
}

#[test]
fn redir_answers_with_caddys_status_and_location() {
    let both = Both::start(
        "http://plain.local {\n\tredir /old /new\n\tredir /moved /there permanent\n\tredir /temp /here temporary\n\tredir /gone https://new.example.org/ 308\n\tredir /seeother /form 303\n\treverse_proxy @ECHO@\n}\n",
    );
    for (target, status) in [
        ("/old", 302),
        ("/moved", 301),
        ("/temp", 302),
        ("/gone", 308),
        ("/seeother", 303),
        ("/old/deeper", 200),
        ("/old?x=1", 302),
    ] {
        both.get(target)
            .caddy_status(status)
            .assert_same(&["location"]);
    }
    both.stop();
}

#[test]
fn header_rules_change_the_same_response_headers_as_caddy() {
    let both = Both::start(
        "http://plain.local {\n\theader X-Frame-Options DENY\n\theader /static/* Cache-Control \"public, max-age=3600\"\n\theader {\n\t\tX-Content-Type-Options nosniff\n\t\tReferrer-Policy strict-origin-when-cross-origin\n\t\t+X-Extra one\n\t}\n\treverse_proxy @ECHO@\n}\n",
    );
    let headers = [
        "x-frame-options",
        "cache-control",
        "x-content-type-options",
        "referrer-policy",
        "content-type",
        "x-extra",
    ];
    for target in ["/", "/static/app.css", "/static", "/other/static/x"] {
        both.get(target).caddy_status(200).assert_same(&headers);
    }
    both.stop();
}

#[test]
fn basic_auth_lets_in_and_keeps_out_the_same_requests_as_caddy() {
    let template = format!(
        "http://plain.local {{\n\tbasicauth /admin/* {{\n\t\talice {HASH}\n\t}}\n\treverse_proxy @ECHO@\n}}\n"
    );
    let both = Both::start(&template);
    let headers = ["www-authenticate"];
    // The edge answers 401 with a short text, Caddy with no body.
    both.get("/admin/panel")
        .caddy_status(401)
        .assert_same_head(&headers);
    both.request(&Req::get("/admin/panel").header("Authorization", RIGHT))
        .caddy_status(200)
        .assert_same(&headers);
    for auth in [WRONG, STRANGER, "Basic !!!", "Bearer x", "Basic "] {
        both.request(&Req::get("/admin/panel").header("Authorization", auth))
            .caddy_status(401)
            .assert_same_head(&headers);
    }
    both.request(&Req::get("/public").header("Authorization", WRONG))
        .caddy_status(200)
        .assert_same(&headers);
    both.get("/admin").caddy_status(200).assert_same(&headers);
    both.stop();
}
