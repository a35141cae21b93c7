//! Differential tests for the directives, matchers and placeholders the other differential
//! tests leave out (`map`, `request_body`, the `file`, `expression`, `vars`, `vars_regexp`,
//! `host`, `protocol` and `client_ip` matchers, `uri` in all its forms, `encode`, `abort`, and
//! the placeholder families). Each test is one table: one template served by the edge and by
//! Caddy 2.6 (see `differential`), many requests to the pair, so the suite stays fast.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime};

use crate::differential::{Both, Req};
use crate::support::Upstreams;

#[test]
fn a_quoted_looking_path_pattern_is_a_literal_word_that_never_matches_as_in_caddy() {
    // From the corpus (14-nextcloud-forbidden-quoted): the Caddyfile has no single quotes, so
    // the first and last patterns keep a `'` and the middle ones work.
    let both = Both::start(
        "http://plain.local {\n\t@forbidden path '/.htaccess /data/* /occ /console.php'\n\trespond @forbidden 403\n\trespond \"open {path}\"\n}\n",
    );
    for (target, status) in [
        ("/.htaccess", 200),
        ("/data/x", 403),
        ("/occ", 403),
        ("/console.php", 200),
        ("/console.php'", 403),
        ("/console.php%27", 403),
        ("/'/.htaccess", 200),
    ] {
        both.get(target).caddy_status(status).assert_same(&[]);
    }
    both.stop();
}

const MAP: &str = r#"http://plain.local {
	map {path} {section} {tier} {
		/a alpha gold
		~^/u/(?P<name>[a-z]+)$ user-${name} -
		/dash - silver
		/host "on {host}" {method}
		default other bronze
	}
	map {header.X-Env} {env_name} {
		prod production
	}
	map {section} {shout} {
		alpha ALPHA
		default "quiet {tier}"
	}
	@gold vars {tier} gold
	@nil vars {env_name} <nil>
	@alpha expression `{section} == "alpha"`
	rewrite /rw /a
	handle /nil {
		respond @nil "no env"
		respond "env {env_name}"
	}
	respond @gold "gold {section} {tier} {shout}"
	respond @alpha "never: gold wins"
	respond "{section} {tier} [{env_name}] {shout}"
}
"#;

#[test]
fn map_defines_placeholders_that_later_directives_and_matchers_read_lazily_as_caddy_does() {
    let both = Both::start(MAP);
    for req in [
        Req::get("/a"),
        Req::get("/u/bob"),
        Req::get("/u/Bob"),
        Req::get("/dash"),
        Req::get("/host"),
        Req::new("POST", "/host"),
        Req::get("/zzz"),
        // The source is read when the placeholder is: after the rewrite, {path} is /a.
        Req::get("/rw"),
        Req::get("/zzz").header("X-Env", "prod"),
        Req::get("/nil"),
        Req::get("/nil").header("X-Env", "prod"),
        Req::get("/nil").header("X-Env", "dev"),
    ] {
        both.request(&req).caddy_status(200).assert_same(&[]);
    }
    for (target, body) in [
        ("/rw", "gold alpha gold ALPHA"),
        ("/u/bob", "user-bob bronze [] quiet bronze"),
        ("/host", "on plain.local GET [] quiet GET"),
    ] {
        assert_eq!(both.get(target).caddy.text(), body, "{target}");
    }
    both.stop();
}

#[test]
fn request_body_max_size_answers_413_for_a_body_read_past_it_as_caddy_does() {
    let both = Both::start(
        "http://plain.local {\n\trequest_body /up/* {\n\t\tmax_size 10\n\t}\n\thandle /up/respond {\n\t\trespond \"not read\"\n\t}\n\treverse_proxy @ECHO@\n}\n",
    );
    let big = "this body is longer than ten bytes";
    for (req, status) in [
        (Req::new("POST", "/up/x").body("short"), 200),
        (Req::new("POST", "/up/x").body("exactly10!"), 200),
        (Req::new("POST", "/up/x").body(big).chunked(), 413),
        (Req::new("POST", "/up/x").body("short").chunked(), 200),
        // A handler that never reads the body is not limited, in Caddy as here.
        (Req::new("POST", "/up/respond").body(big), 200),
        (Req::new("POST", "/elsewhere").body(big), 200),
    ] {
        both.request(&req).caddy_status(status).assert_same(&[]);
    }
    // A declared length over the limit: Caddy 2.6 answers 502 (its proxy sees the read
    // error), the edge 413 without reading the body (a deliberate difference, in the man page).
    let declared = both.request(&Req::new("POST", "/up/x").body(big));
    assert_eq!(declared.caddy.status, 502, "{}", declared.caddy);
    assert_eq!(declared.edge.status, 413, "{}", declared.edge);
    assert_eq!(declared.edge.header("connection").as_deref(), Some("close"));
    both.stop();
}

/// Sends `head` and `body` to the edge, never finishing the body, and reads the answer.
fn unfinished(port: u16, head: &str, body: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut got = [0u8; 512];
    let n = stream.read(&mut got).unwrap_or(0);
    String::from_utf8_lossy(&got[..n]).into_owned()
}

#[test]
fn request_body_max_size_refuses_an_attackers_body_as_it_streams_not_after_it_ends() {
    let both = Both::start(
        "http://plain.local {\n\trequest_body {\n\t\tmax_size 1KB\n\t}\n\treverse_proxy @ECHO@\n}\n",
    );
    let port = both.edge_port();
    // A gigabyte announced: answered at once, nothing read.
    let answer = unfinished(
        port,
        "POST /x HTTP/1.1\r\nHost: plain.local\r\nContent-Length: 1000000000\r\n\r\n",
        b"",
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    // A chunked body that goes on for ever: the first chunk past the limit ends it.
    let chunk = vec![b'x'; 2000];
    let mut body = format!("{:x}\r\n", chunk.len()).into_bytes();
    body.extend_from_slice(&chunk);
    body.extend_from_slice(b"\r\n");
    let answer = unfinished(
        port,
        "POST /x HTTP/1.1\r\nHost: plain.local\r\nTransfer-Encoding: chunked\r\n\r\n",
        &body,
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    both.stop();
}

const FILES: &str = r#"http://plain.local {
	root * @SITE@
	@exists file
	@html file {
		try_files {path}.html {path}/index.html
	}
	@big file {
		try_files /a.txt /b.txt /c.txt
		try_policy largest_size
	}
	@small file {
		try_files /a.txt /b.txt /c.txt /empty.txt
		try_policy smallest_size
	}
	@new file {
		try_files /*.txt
		try_policy most_recently_modified
	}
	@php file {
		try_files {path}
		split_path .php
	}
	@sub file {
		root @SITE@/sub
		try_files {query.f} /nothing
	}
	@dir file {path}/
	handle /big {
		respond @big "{file_match.relative} {file_match.type}"
	}
	handle /small {
		respond @small "{file_match.relative}"
	}
	handle /new {
		respond @new "{file_match.relative}"
	}
	handle /q {
		respond @sub "found {file_match.relative} {file_match.absolute}"
		respond "none" 404
	}
	handle /scripts/* {
		respond @php "php {file_match.relative} rest {file_match.remainder}"
		respond "no script" 404
	}
	respond @dir "dir {file_match.relative} {file_match.type}"
	respond @html "html {file_match.relative}"
	respond @exists "exists {file_match.relative} {file_match.type}"
	respond "missing" 404
}
"#;

#[test]
fn the_file_matcher_finds_the_same_files_as_caddy_and_never_leaves_the_root() {
    let site = testkit::Scratch::new("edge-file-matcher").unwrap();
    for (name, text) in [
        ("index.html", "home"),
        ("about.html", "about"),
        ("docs/index.html", "docs"),
        ("a.txt", "aaaa"),
        ("b.txt", "bbbbbbbbbb"),
        ("c.txt", "cc"),
        ("empty.txt", ""),
        ("scripts/run.php", "<?php"),
        ("sub/inner.txt", "inner"),
        ("secret.txt", "outside sub"),
    ] {
        let path = site.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        // c.txt is the newest; the rest are older, in a known order.
        let age = if name == "c.txt" { 0 } else { 3600 };
        let when = SystemTime::now() - Duration::from_secs(age);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }
    let both = Both::start_with(
        Upstreams::new(),
        FILES,
        &[("@SITE@", site.path().display().to_string())],
    );
    for (target, status) in [
        ("/index.html", 200),
        ("/about", 200),
        ("/docs", 200),
        ("/docs/", 200),
        ("/big", 200),
        ("/small", 200),
        ("/new", 200),
        ("/q?f=inner.txt", 200),
        ("/scripts/run.php/extra/path", 200),
        ("/scripts/run.php", 200),
        ("/scripts/none.php/x", 404),
        ("/nope", 404),
        ("/%61bout.html", 200),
        // Attempts to leave the root: each must stay under it, as in Caddy.
        ("/../../../../etc/passwd", 404),
        ("/%2e%2e/%2e%2e/%2e%2e/etc/passwd", 404),
        ("/q?f=../secret.txt", 404),
        ("/q?f=../../../../etc/passwd", 404),
        ("/q?f=%2e%2e/secret.txt", 404),
        ("/q?f=*.txt", 404),
    ] {
        both.get(target).caddy_status(status).assert_same(&[]);
    }
    both.stop();
}

const EXPRESSIONS: &str = r#"http://plain.local {
	vars tier gold
	@get expression {method} == "GET"
	@api expression `{path}.startsWith("/api")`
	@combo `path('/x*') && header({'X-Key': 'y'})`
	@local expression "remote_ip('127.0.0.0/8') && !({method} in ['POST', 'PUT'])"
	@far expression "remote_ip('10.0.0.0/8') || {query} == 'far=1'"
	@sized expression `size({query}) > 3 && {header.X-Num}.matches("^[0-9]+$")`
	@gold vars tier gold silver
	@other vars tier bronze
	@re vars_regexp t tier ^g(o+)ld$
	@missing vars nope <nil>
	handle /e/get {
		respond @get "get"
		respond "not get"
	}
	handle /api* {
		respond @api "api {method}"
	}
	handle /x* {
		respond @combo "combo"
		respond "no combo"
	}
	handle /local {
		respond @local "local"
		respond "not local"
	}
	handle /far {
		respond @far "far"
		respond "near"
	}
	handle /sized {
		respond @sized "sized"
		respond "unsized"
	}
	handle /vars {
		respond @other "bronze"
		respond @gold "gold"
	}
	handle /re {
		respond @re "o's: {re.t.1}"
	}
	handle /missing {
		respond @missing "unset is <nil>"
	}
	respond "fallback"
}
"#;

#[test]
fn expression_vars_and_vars_regexp_matchers_match_the_same_requests_as_caddy() {
    let both = Both::start(EXPRESSIONS);
    for req in [
        Req::get("/e/get"),
        Req::new("POST", "/e/get"),
        Req::new("HEAD", "/e/get"),
        Req::get("/api/x"),
        Req::new("DELETE", "/apix"),
        Req::get("/xyz").header("X-Key", "y"),
        Req::get("/xyz").header("X-Key", "n"),
        Req::get("/X").header("x-key", "y"),
        Req::get("/local"),
        Req::new("PUT", "/local"),
        Req::get("/far"),
        Req::get("/far?far=1"),
        Req::get("/sized?abcd").header("X-Num", "42"),
        Req::get("/sized?abcd").header("X-Num", "4a"),
        Req::get("/sized?a").header("X-Num", "42"),
        Req::get("/sized?abcd"),
        Req::get("/vars"),
        Req::get("/re"),
        Req::get("/missing"),
    ] {
        both.request(&req).caddy_status(200).assert_same(&[]);
    }
    both.stop();
}

const ROUTING_REST: &str = r#"http://plain.local, http://other.local {
	@other host other.local
	@http1 protocol http/1.1
	@h2 protocol http/2+
	@plain protocol http
	@tls protocol https
	@client remote_ip 127.0.0.1/32
	@far remote_ip 10.0.0.0/8
	@nokey header !X-Key
	@session header Cookie *session=*
	@token header X-Token "t-{env.PATH}"
	uri /suffix/* strip_suffix .html
	uri /prefix/* strip_prefix /prefix
	uri /replace/* replace foo bar 1
	uri /re/* path_regexp ^/re/(\d+)$ /re/n$1
	handle /abort {
		abort
	}
	handle /proto {
		respond @h2 "h2"
		respond @tls "tls"
		respond @http1 "http/1.1"
	}
	handle /plain {
		respond @plain "plain"
	}
	handle /client {
		respond @far "far"
		respond @client "client"
	}
	handle /key {
		respond @nokey "no key"
		respond "key"
	}
	handle /token {
		respond @token "token"
		respond "no token"
	}
	handle /cookie {
		respond @session "session"
		respond "no session"
	}
	respond @other "other {host}"
	respond "{path}?{query}"
}
"#;

#[test]
fn uri_abort_and_the_host_protocol_remote_ip_and_header_matchers_answer_as_caddy_does() {
    let both = Both::start(ROUTING_REST);
    for req in [
        Req::get("/suffix/a.html?x=1"),
        Req::get("/suffix/a.htm"),
        Req::get("/prefix/x/y"),
        Req::get("/replace/foofoo"),
        Req::get("/re/42"),
        Req::get("/re/x"),
        Req::get("/proto"),
        Req::get("/plain"),
        Req::get("/client"),
        Req::get("/key"),
        Req::get("/key").header("X-Key", "k"),
        Req::get("/cookie").header("Cookie", "a=1; session=xyz"),
        Req::get("/cookie").header("Cookie", "a=1"),
        // {env.X} in a matcher value is read at load, as Caddy renders it.
        Req::get("/token").header("X-Token", &format!("t-{}", std::env::var("PATH").unwrap())),
        Req::get("/token").header("X-Token", "t-{env.PATH}"),
        Req::get("/anything").host(Some("other.local")),
        Req::get("/anything").host(Some("OTHER.local:80")),
    ] {
        both.request(&req)
            .caddy_status(200)
            .assert_same(&["content-type"]);
    }
    let (edge, caddy) = both.raw(&Req::get("/abort"));
    assert!(caddy.is_empty(), "caddy answered {caddy:?}");
    assert!(edge.is_empty(), "the edge answered {edge:?}");
    both.stop();
}

#[test]
fn placeholder_families_render_the_same_values_as_caddys() {
    let both = Both::start(
        "http://plain.local {\n\trewrite /rw/* /new{path}?moved=1\n\thandle /up/* {\n\t\treverse_proxy @ECHO@ {\n\t\t\theader_down X-Up {upstream_hostport}\n\t\t}\n\t}\n\trespond \"host={host} hostport={hostport} uri={uri} path={path} query={query} method={method} scheme={scheme} rh={remote_host} dir={dir} file={file} ou={http.request.orig_uri} op={http.request.orig_uri.path} oq={http.request.orig_uri.query} h={header.X-A} c={cookie.c} q={query.q} p0={path.0} p1={path.1} l0={labels.0} l1={labels.1} proto={http.request.proto} long={http.request.uri.path} env={env.PATH} unset=[{env.EDGE_COVERAGE_UNSET}]\"\n}\n",
    );
    for req in [
        Req::get("/a/b.txt?q=1&z=2")
            .header("X-A", "one")
            .header("Cookie", "c=cv; d=dv"),
        Req::get("/rw/x?y=2"),
        Req::new("POST", "/dir/").body("x"),
        Req::get("/q?q=a%20b&q=second"),
        Req::get("/x").host(Some("plain.local:80")),
        Req::get("/x").host(Some("Plain.LOCAL")),
    ] {
        // Caddy sends the text of a placeholder without a value (an absent cookie); the
        // edge sends it empty (a difference in the man page), so the cookie is always there.
        let req = req.header("Cookie", "c=cv");
        both.request(&req).caddy_status(200).assert_same(&[]);
    }
    both.get("/up/x?y=1")
        .caddy_status(200)
        .assert_same(&["x-up"]);
    both.stop();
}

#[test]
fn file_server_answers_ranges_conditionals_sidecars_and_hidden_files_as_caddy_does() {
    let site = testkit::Scratch::new("edge-file-server").unwrap();
    let big: String = (0..100).map(|i| format!("line {i:03}\n")).collect();
    for (name, text) in [
        ("index.html", "<h1>home</h1>\n".to_owned()),
        ("style.css", "body { color: red }\n".to_owned()),
        ("big.txt", big),
        ("pre.js", "console.log('plain')\n".to_owned()),
        (".secret", "hidden\n".to_owned()),
        ("old.bak", "backup\n".to_owned()),
        ("sub/a.txt", "a\n".to_owned()),
    ] {
        let path = site.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
    }
    // A gzip sidecar, as `precompressed` serves it (its bytes are sent as they are).
    let gzipped = std::process::Command::new("gzip")
        .arg("-kn9")
        .arg(site.join("pre.js"))
        .status()
        .unwrap();
    assert!(gzipped.success());
    let both = Both::start_with(
        Upstreams::new(),
        "http://plain.local {\n\troot * @SITE@\n\tfile_server {\n\t\thide .secret *.bak\n\t\tprecompressed gzip\n\t}\n}\n",
        &[("@SITE@", site.path().display().to_string())],
    );
    let headers = [
        "content-type",
        "content-length",
        "content-range",
        "content-encoding",
        "etag",
        "last-modified",
        "location",
        "accept-ranges",
        "vary",
    ];
    let first = both.get("/big.txt");
    first.caddy_status(200).assert_same(&headers);
    let etag = first.caddy.header("etag").expect("caddy sends an ETag");
    for (req, status) in [
        (Req::get("/"), 200),
        (Req::get("/index.html"), 200),
        (Req::get("/style.css"), 200),
        (Req::new("HEAD", "/style.css"), 200),
        (Req::get("/big.txt").header("Range", "bytes=0-9"), 206),
        (Req::get("/big.txt").header("Range", "bytes=-5"), 206),
        (Req::get("/big.txt").header("Range", "bytes=5000-"), 416),
        (Req::get("/big.txt").header("If-None-Match", &etag), 304),
        (
            Req::get("/big.txt").header("If-None-Match", "\"other\""),
            200,
        ),
        (Req::get("/pre.js").header("Accept-Encoding", "gzip"), 200),
        (Req::get("/pre.js"), 200),
        (Req::get("/.secret"), 404),
        (Req::get("/old.bak"), 404),
        (Req::get("/sub"), 404),
        (Req::get("/sub/a.txt"), 200),
        (Req::get("/missing"), 404),
    ] {
        both.request(&req)
            .caddy_status(status)
            .assert_same(&headers);
    }
    both.stop();
}

const ENCODED: &str = r#"http://plain.local {
	encode /gz/* gzip
	handle /gz/small {
		respond "too small to compress"
	}
	respond "@LONG@"
}
"#;

/// `gzip -dc` of `bytes`: the two servers' compressors differ, what they compress must not.
fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut child = std::process::Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "gzip -dc failed");
    out.stdout
}

#[test]
fn encode_compresses_the_same_responses_as_caddy() {
    let long = "compressible text ".repeat(100);
    let both = Both::start(&ENCODED.replace("@LONG@", &long));
    let headers = ["content-encoding", "vary", "content-type"];
    for req in [
        Req::get("/plain"),
        Req::get("/gz/x"),
        Req::get("/gz/x").header("Accept-Encoding", "zstd"),
        Req::get("/gz/small").header("Accept-Encoding", "gzip"),
        Req::get("/gz/x").header("Accept-Encoding", "gzip;q=0"),
    ] {
        both.request(&req).caddy_status(200).assert_same(&headers);
    }
    let pair = both.request(&Req::get("/gz/x").header("Accept-Encoding", "gzip, br"));
    pair.caddy_status(200).assert_same_head(&headers);
    assert_eq!(
        pair.caddy.header("content-encoding").as_deref(),
        Some("gzip")
    );
    assert_eq!(gunzip(&pair.edge.body), gunzip(&pair.caddy.body));
    assert_eq!(gunzip(&pair.edge.body), long.as_bytes());
    both.stop();
}

const HEADERS_FILES: &str = r#"http://plain.local {
	root * @SITE@
	header {
		-Server
		?X-Default fallback
		X-Replace one-two-three
		defer
	}
	header /keep/* ?X-Default kept
	header /re/* {
		X-Replace "-" "+"
		defer
	}
	handle /t/* {
		try_files {path} {path}/index.txt =404
		file_server
	}
	handle /q/* {
		try_files /exists.txt?from={path}
		respond "{uri}"
	}
	handle /rq/* {
		rewrite * /rewritten?p={path}&{query}&h={header.X-H}
		respond "{uri}"
	}
	handle_path /list/* {
		root * @SITE@/list
		file_server browse
	}
	handle /close {
		respond "bye" {
			close
		}
	}
	respond "x {path}"
}
"#;

#[test]
fn header_operations_try_files_statuses_respond_close_and_browse_listings_answer_as_caddy_does() {
    let site = testkit::Scratch::new("edge-headers-files").unwrap();
    for (name, text) in [
        ("exists.txt", "exists\n"),
        ("t/a.txt", "a\n"),
        ("t/d/index.txt", "index\n"),
        ("list/one.txt", "1\n"),
        ("list/two.css", "2\n"),
        ("list/dir/three", "3\n"),
    ] {
        let path = site.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
    }
    let both = Both::start_with(
        Upstreams::new(),
        HEADERS_FILES,
        &[("@SITE@", site.path().display().to_string())],
    );
    let headers = [
        "server",
        "x-default",
        "x-replace",
        "content-type",
        "location",
        "connection",
    ];
    for (req, status) in [
        (Req::get("/"), 200),
        (Req::get("/keep/x"), 200),
        (Req::get("/re/x"), 200),
        (Req::get("/t/a.txt"), 200),
        (Req::get("/t/d"), 200),
        (Req::get("/q/anything?x=2"), 200),
        // A value with & or = stays one value: Caddy escapes placeholders in a query.
        (Req::get("/q/a&admin=1"), 200),
        (Req::get("/rq/a&b=c?x=1&y=2").header("X-H", "a b&c"), 200),
        (Req::get("/list/").header("Accept", "application/json"), 200),
        (
            Req::get("/list/dir/").header("Accept", "application/json"),
            200,
        ),
        (Req::get("/list/one.txt"), 200),
        (Req::get("/close"), 200),
    ] {
        both.request(&req)
            .caddy_status(status)
            .assert_same(&headers);
    }
    // The HTML listing is the edge's own page (a difference in the man page).
    both.get("/list/")
        .caddy_status(200)
        .assert_same_head(&["content-type"]);
    // An error status (try_files =404) is written without the header changes by Caddy and
    // with them by the edge (a difference in the man page): the rest must agree.
    both.get("/t/missing")
        .caddy_status(404)
        .assert_same(&["content-type", "location"]);
    both.stop();
}
