//! The handler chain answers as Caddy 2.6 does on the same Caddyfile: named matchers of every
//! kind, `handle`/`handle_path`/`route` blocks, `respond`, `rewrite`, `uri`, `redir html`,
//! `error` with `handle_errors`, `vars`, and placeholders in `header_up`. Each test serves one
//! template from both (see `differential`) and sends many requests to the one pair.

use crate::differential::{Both, Req};

const ROUTING: &str = r#"http://plain.local {
	@api path /api/*
	@post method POST
	@json header Accept *json*
	@q query debug=1
	@user path_regexp user ^/users/([a-z]+)$
	@ua header_regexp ua User-Agent ^curl/([0-9]+)
	@block {
		path /secret/*
		not header X-Key letmein
	}
	@remote remote_ip 127.0.0.0/8
	@elsewhere not remote_ip 127.0.0.0/8

	vars site plain
	header X-Site {vars.site}
	redir /html /target html
	rewrite /old-path /api/rewritten?{query}
	handle_path /strip/* {
		reverse_proxy @ECHO@
	}
	handle @api {
		respond @post "posted" 201
		reverse_proxy @ECHO@
	}
	handle /fail {
		error "nope" 418
	}
	handle /json {
		respond @json "json" 200
		respond "not json" 406
	}
	handle /q {
		respond @q "debug"
		respond "plain"
	}
	route /route/* {
		uri strip_prefix /route
		respond "in route {path}"
	}
	handle /who {
		respond @elsewhere "far"
		respond @remote "near {remote_host}"
	}
	respond @block "blocked" 403
	respond @user "user {re.user.1}"
	respond @ua "curl {re.ua.1}"
	respond "fallback {method} {path} {query}"
	handle_errors {
		respond "error {http.error.status_code}"
	}
}
"#;

#[test]
fn named_matchers_and_handle_blocks_route_requests_as_caddy_does() {
    let both = Both::start(ROUTING);
    let headers = ["content-type", "location", "x-site"];
    for (req, status) in [
        (Req::get("/api/x?y=1"), 200),
        (Req::new("POST", "/api/x").body("a=1"), 201),
        (Req::get("/old-path?a=1"), 200),
        (Req::get("/strip/a/b?z=1"), 200),
        (Req::get("/json").header("Accept", "application/json"), 200),
        (Req::get("/json").header("Accept", "text/html"), 406),
        (Req::get("/q?debug=1"), 200),
        (Req::get("/q?debug=2"), 200),
        (Req::get("/route/x"), 200),
        (Req::get("/secret/x"), 403),
        (Req::get("/secret/x").header("X-Key", "letmein"), 200),
        (Req::get("/users/bob"), 200),
        (Req::get("/users/Bob1"), 200),
        (Req::get("/").header("User-Agent", "curl/8.1"), 200),
        (Req::get("/html"), 200),
        (Req::get("/other?x=1"), 200),
        (Req::get("/who"), 200),
        (Req::get("/API/x"), 200),
        (Req::get("/%61pi/x"), 200),
    ] {
        both.request(&req)
            .caddy_status(status)
            .assert_same(&headers);
    }
    // The error page keeps the error's status and the headers set before the error.
    both.get("/fail").caddy_status(418).assert_same(&headers);
    both.stop();
}

#[test]
fn placeholders_in_header_up_reach_the_upstream_as_values_not_text() {
    let both = Both::start(
        "http://plain.local {\n\treverse_proxy @ECHO@ {\n\t\theader_up X-Real-IP {remote_host}\n\t\theader_up X-Orig-Uri {uri}\n\t\theader_up X-Host {host}\n\t\theader_up X-Agent \"agent {http.request.header.User-Agent}\"\n\t\theader_up -X-Drop\n\t\theader_down X-Down \"{method} {path}\"\n\t}\n}\n",
    );
    let pair = both.request(
        &Req::get("/a/b?c=d")
            .header("User-Agent", "tester/1")
            .header("X-Drop", "gone"),
    );
    pair.caddy_status(200).assert_same(&["x-down"]);
    assert!(
        pair.edge.text().contains("x-real-ip: 127.0.0.1\n"),
        "{}",
        pair.edge.text()
    );
    both.stop();
}

#[test]
fn root_try_files_and_file_server_serve_a_static_site_as_caddy_does() {
    let site = testkit::Scratch::new("edge-chain-site").unwrap();
    for (name, text) in [
        ("index.html", "<h1>home</h1>\n"),
        ("about.html", "<p>about</p>\n"),
        ("docs/index.html", "<p>docs</p>\n"),
        ("docs/guide.txt", "read me\n"),
        ("app.css", "body { color: red }\n"),
    ] {
        let path = site.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let both = Both::start_with(
        crate::support::Upstreams::new(),
        "http://plain.local {\n\troot * @SITE@\n\thandle_path /assets/* {\n\t\tfile_server\n\t}\n\thandle {\n\t\ttry_files {path} {path}/ /index.html\n\t\tfile_server\n\t}\n}\n",
        &[("@SITE@", site.path().display().to_string())],
    );
    let headers = [
        "content-type",
        "location",
        "etag",
        "last-modified",
        "content-length",
    ];
    for (target, status) in [
        ("/", 200),
        ("/about.html", 200),
        ("/about.html?x=1", 200),
        ("/docs", 308),
        ("/docs/", 200),
        ("/docs/guide.txt", 200),
        ("/nope", 200),
        ("/assets/app.css", 200),
        ("/assets/missing.css", 404),
    ] {
        both.get(target).caddy_status(status).assert_same(&headers);
    }
    both.stop();
}
