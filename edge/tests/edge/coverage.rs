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
